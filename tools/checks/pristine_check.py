"""Does an EDM snapshot load and sample with the upstream code alone, as a user of upstream EDM would?

    python -m tools.checks.pristine_check runs/edm-cifar10-cond-classlora-smoke/network-snapshot-000002.pkl [...]

For each snapshot, a fresh Python process with only vendor/pristine/edm (EDM at the pinned commit,
no patch, no overlay) on its path unpickles the network (EDM pickles carry the source of their
classes) and draws 4 images on the CPU with pristine generate.py's own sampler function
(generate.py's main needs CUDA). Prints what it loaded; exit status 1 if any snapshot fails.
"""

import os
import subprocess
import sys

from tools import ROOT

PRISTINE_EDM = os.path.join(ROOT, 'vendor', 'pristine', 'edm')

# Run in the pristine tree: only its modules, torch and numpy are importable there.
CHECK = '''
import pickle, sys, torch
from generate import edm_sampler
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
print(f'{type(net.model).__name__}, {sum(p.numel() for p in net.parameters()):,} parameters, label_dim {net.label_dim}; '
      f'4 samples {tuple(images.shape[1:])}, finite; conditioning parameters: {", ".join(added) or "none"}')
'''


def main():
    paths = sys.argv[1:]
    if not paths or any(path.startswith('-') for path in paths):
        sys.exit(__doc__.strip().split('\n\n')[0] + '\n\nusage: python -m tools.checks.pristine_check SNAPSHOT.pkl [...]')
    if not os.path.isdir(PRISTINE_EDM):
        sys.exit('pristine_check: vendor/pristine/edm is missing; run `make vendor-edm` first')
    failed = 0
    for path in paths:
        if not os.path.isfile(path):
            print(f'{path}: no such file')
            failed += 1
            continue
        result = subprocess.run([sys.executable, '-c', CHECK, os.path.abspath(path)], cwd=PRISTINE_EDM, text=True, capture_output=True,
                                env=dict(os.environ, PYTHONPATH=PRISTINE_EDM))
        if result.returncode == 0:
            print(f'{path}: loads in pristine EDM: {result.stdout.strip()}')
        else:
            print(f'{path}: FAILS in pristine EDM: {(result.stderr.strip().splitlines() or ["no output"])[-1]}')
            failed += 1
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
