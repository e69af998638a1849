"""Does an EDM (or EDM2) snapshot load and sample with the upstream code alone, as a user of upstream EDM would?

    python -m tools.checks.pristine_check runs/edm-cifar10-cond-classlora-smoke/network-snapshot-000002.pkl [...]
    python -m tools.checks.pristine_check --upstream=edm2 runs/edm2-cifar10-uncond-with-lora-smoke/phema-0000002-0.075.pkl [...]

For each snapshot, a fresh Python process with only vendor/pristine/<upstream> (the upstream at the pinned
commit, no patch, no overlay) on its path unpickles the network (EDM's and EDM2's pickles carry the source of
their classes) and draws 4 images on the CPU with the pristine sampler function (generate.py's, EDM2's
generate_images.py's: their main functions need CUDA). Prints what it loaded; exit status 1 if any snapshot fails.
"""

import os
import subprocess
import sys

from tools import ROOT

# The module of each upstream's sampler function, and the attribute that holds its U-Net.
UPSTREAMS = {'edm': ('generate', 'model'), 'edm2': ('generate_images', 'unet')}

# Run in the pristine tree: only its modules, torch and numpy are importable there.
CHECK = '''
import importlib, pickle, sys, torch
edm_sampler = importlib.import_module(sys.argv[2]).edm_sampler
with open(sys.argv[1], 'rb') as f:
    net = pickle.load(f)['ema'].eval()
def conditioning(name): # 'model.enc.16x16_block0.qkv.lora_mlp.layers.0.weight' -> 'qkv.lora_mlp'
    parts = name.split('.')
    first = next((i for i, part in enumerate(parts) if part.startswith('lora_') or part == 'adaln'), None)
    return None if first is None else parts[first - 1] + '.' + parts[first]
added = sorted({conditioning(name) for name, _ in net.named_parameters()} - {None})
generator = torch.Generator().manual_seed(0)
latents = torch.randn([4, net.img_channels, net.img_resolution, net.img_resolution], generator=generator)
labels = torch.eye(net.label_dim)[[0, 1, 2, 3]] if net.label_dim else None
with torch.no_grad():
    images = edm_sampler(net, latents, labels, num_steps=4)
assert torch.isfinite(images).all(), 'samples are not finite'
print(f'{type(getattr(net, sys.argv[3])).__name__}, {sum(p.numel() for p in net.parameters()):,} parameters, label_dim {net.label_dim}; '
      f'4 samples {tuple(images.shape[1:])}, finite; conditioning parameters: {", ".join(added) or "none"}')
'''


def main():
    paths = sys.argv[1:]
    upstream = 'edm'
    if paths and paths[0].startswith('--upstream='):
        upstream, paths = paths[0].split('=', 1)[1], paths[1:]
    if upstream not in UPSTREAMS or not paths or any(path.startswith('-') for path in paths):
        sys.exit(__doc__.strip().split('\n\n')[0] + '\n\nusage: python -m tools.checks.pristine_check [--upstream=edm|edm2] SNAPSHOT.pkl [...]')
    pristine = os.path.join(ROOT, 'vendor', 'pristine', upstream)
    if not os.path.isdir(pristine):
        sys.exit(f'pristine_check: vendor/pristine/{upstream} is missing; run `make vendor-{upstream}` first')
    failed = 0
    for path in paths:
        if not os.path.isfile(path):
            print(f'{path}: no such file')
            failed += 1
            continue
        result = subprocess.run([sys.executable, '-c', CHECK, os.path.abspath(path), *UPSTREAMS[upstream]], cwd=pristine, text=True,
                                capture_output=True, env=dict(os.environ, PYTHONPATH=pristine))
        if result.returncode == 0:
            print(f'{path}: loads in pristine {upstream.upper()}: {result.stdout.strip()}')
        else:
            print(f'{path}: FAILS in pristine {upstream.upper()}: {(result.stderr.strip().splitlines() or ["no output"])[-1]}')
            failed += 1
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
