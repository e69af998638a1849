"""EDM2's magnitude invariants over training, measured on EDM2 runs side by side (a baseline beside its LoRA run).

    python -m tools.figures.magnitudes runs/edm2-mini-uncond-baseline-seed0 runs/edm2-mini-uncond-with-lora-seed0 [--out FILE.png]

EDM2 keeps every activation at unit magnitude and every weight normalised; UC-LoRA in its form (overlay/edm2/
training/lora_edm2.py) must keep that. For each run, at the start (its 0-kimg snapshot: the initial network) and
at every training state (training-state-<kimg>.pt: the trained weights, not an EMA), this measures on one fixed
batch (the first 64 images of the run's dataset, each noised at a level drawn from the run's training
distribution, the same for every run and time):

- the RMS of every Block's output (encoder and decoder): EDM2 keeps it about 1 (each Block ends in mp_sum and a clip);
- for every UC-LoRA layer, the size of its update against its base weight: ||dW|| / ||W'|| (Frobenius), where
  W' is the base MPConv's weight as it computes with it (normalised rows, / sqrt(fan-in)) and
  dW = g / sqrt(m) sum_i omega_i B_i' A_i' the sample's LoRA update, averaged over the batch;
- the largest deviation from 1 of the RMS of a weight row (every MPConv weight, LoRA's A and B): forced weight
  normalisation keeps the stored weights on the unit sphere once training has started.

Writes FILE.png (default: magnitudes.png in the last run folder) and the numbers beside it (.json); prints a line
a run and time.
"""

import argparse
import glob
import json
import os
import pickle
import sys

import numpy as np
import torch

from tools.scoring.records import number_in_name
from tools.vendoring.run import interruptible
from tools.vendoring.upstream import import_vendor_tree

TOOL = 'magnitudes'
PROBE_IMAGES = 64
PROBE_SEED = 0


class RunError(Exception):
    """A run folder this tool cannot read, in one line."""


def load_edm2():
    """EDM2's modules (its tree first on sys.path): the dataset and encoder classes, and the LoRA layer's weight rule."""
    import_vendor_tree('edm2', TOOL)
    import dnnlib
    from training import lora_edm2
    return dnnlib, lora_edm2


def points(folder):
    """[(kimg, path)]: the 0-kimg snapshot (its EMA is the initial network), then every training state."""
    start = sorted(glob.glob(os.path.join(folder, 'network-snapshot-0000000-*.pkl')))
    states = sorted(glob.glob(os.path.join(folder, 'training-state-*.pt')), key=number_in_name)
    if not start:
        raise RunError(f'{folder}: no network-snapshot-0000000-*.pkl (not an EDM2 run folder, or one that has not started)')
    return [(0, start[0])] + [(number_in_name(path), path) for path in states]


def probe_batch(folder, dnnlib, net):
    """The fixed batch: the run's first images and labels, noised at levels drawn from its training distribution."""
    with open(os.path.join(folder, 'training_options.json')) as f:
        options = json.load(f)
    dataset = dnnlib.util.construct_class_by_name(**options['dataset_kwargs'])
    encoder = dnnlib.util.construct_class_by_name(**options['encoder_kwargs'])
    count = min(PROBE_IMAGES, len(dataset))
    images, labels = zip(*(dataset[index] for index in range(count)))
    x = encoder.encode_latents(torch.as_tensor(np.stack(images)))
    labels = torch.as_tensor(np.stack(labels), dtype=torch.float32) if net.label_dim else None
    generator = torch.Generator().manual_seed(PROBE_SEED)
    loss = options['loss_kwargs']
    sigma = (torch.randn([count], generator=generator) * loss['P_std'] + loss['P_mean']).exp()
    noisy = x + torch.randn(x.shape, generator=generator) * sigma.reshape(-1, 1, 1, 1)
    return noisy, sigma, labels


def measure(net, batch, lora_edm2):
    """{'blocks': {name: RMS}, 'lora': {name: ||dW|| / ||W'||}, 'weight_rms_deviation': max |row RMS - 1|} of one network."""
    blocks, updates, hooks = {}, {}, []
    for name, module in net.unet.named_modules():
        if type(module).__name__ == 'Block':
            hooks.append(module.register_forward_hook(lambda m, i, out, name=name: blocks.__setitem__(name, out.float().square().mean().sqrt().item())))
            for layer in ('attn_qkv', 'attn_proj'):
                lora = getattr(module, f'{layer}_lora', None)
                if lora is not None:
                    hooks.append(lora.register_forward_hook(lambda m, i, out, key=f'{name}.{layer}', base=getattr(module, layer):
                                                            updates.__setitem__(key, relative_update(m, base, i[2], lora_edm2))))
    try:
        with torch.no_grad():
            net(*batch)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(blocks=blocks, lora=updates, weight_rms_deviation=weight_rms_deviation(net))


def lora_update(lora, emb, lora_edm2):
    """dW [N, C_out, C_in]: each sample's LoRA update of its 1x1 base weight, g / sqrt(m) sum_i omega_i B_i' A_i'
    (the layer's output times sqrt(1 + g^2), minus the base's, is dW x)."""
    bases = lora.lora_A.shape[0]
    A = lora_edm2.mp_weight(lora.lora_A, dim=2, training=False) # [m, r, C_in]
    B = lora_edm2.mp_weight(lora.lora_B, dim=2, training=False) # [m, C_out, r]
    omega = lora.lora_mlp(emb.float()) / np.sqrt(bases) # [N, m]
    return lora.lora_gain.float() * torch.einsum('nm,mor,mri->noi', omega, B, A)


def relative_update(lora, base, emb, lora_edm2):
    """Mean over the batch of ||dW|| / ||W'||: the sample's LoRA update of the base weight against the base weight."""
    update = lora_update(lora, emb, lora_edm2)
    w = base.weight.float().flatten(1)
    w = lora_edm2.normalize(w, dim=1) / np.sqrt(w.shape[1]) # as MPConv computes with it (its gain is 1 here)
    return (update.flatten(1).norm(dim=1) / w.norm()).mean().item()


def weight_rms_deviation(net):
    """The largest |RMS - 1| of a weight row among every MPConv (weight of 2 or more dims) and LoRA A and B."""
    worst = 0.0
    for name, p in net.named_parameters():
        if p.ndim >= 2 and (name.endswith('.weight') or name.endswith(('lora_A', 'lora_B'))):
            rows = p.float().flatten(0, -2) if name.endswith(('lora_A', 'lora_B')) else p.float().flatten(1)
            worst = max(worst, (rows.square().mean(dim=-1).sqrt() - 1).abs().max().item())
    return worst


def measure_run(folder, dnnlib, lora_edm2):
    """[{'kimg', 'blocks', 'lora', 'weight_rms_deviation'}] over the run's training."""
    found = points(folder)
    with open(found[0][1], 'rb') as f:
        net = pickle.load(f)['ema'].to(torch.float32).eval().requires_grad_(False)
    batch = probe_batch(folder, dnnlib, net)
    series = []
    for kimg, path in found:
        if path.endswith('.pt'):
            state = torch.load(path, map_location='cpu', weights_only=False)['net']
            net.load_state_dict(state)
        series.append(dict(kimg=kimg, **measure(net, batch, lora_edm2)))
        s = series[-1]
        lora = f', LoRA update / base weight mean {np.mean(list(s["lora"].values())):.3g} (max {max(s["lora"].values()):.3g})' if s['lora'] else ''
        print(f'{os.path.basename(folder)} {kimg:>6} kimg: block output RMS {min(s["blocks"].values()):.3f} to {max(s["blocks"].values()):.3f}'
              f'{lora}; weight rows |RMS - 1| at most {s["weight_rms_deviation"]:.2g}', flush=True)
    return series


def plot(runs, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for index, (name, series) in enumerate(runs.items()):
        color = f'C{index}'
        kimg = [s['kimg'] for s in series]
        for block in series[0]['blocks']:
            axes[0].plot(kimg, [s['blocks'][block] for s in series], color=color, alpha=0.25, lw=0.8)
        axes[0].plot(kimg, [np.mean(list(s['blocks'].values())) for s in series], color=color, lw=2.5, marker='o', label=f'{name} (mean; thin: each block)')
        if series[-1]['lora']:
            for layer in series[-1]['lora']:
                axes[1].plot(kimg, [s['lora'].get(layer, 0) for s in series], color=color, alpha=0.3, lw=0.8)
            axes[1].plot(kimg, [np.mean(list(s['lora'].values())) for s in series], color=color, lw=2.5, marker='o', label=f'{name} (mean; thin: each layer)')
        axes[2].plot(kimg, [s['weight_rms_deviation'] for s in series], color=color, lw=2, marker='o', label=name)
    axes[0].axhline(1, color='0.5', ls='--', lw=1)
    axes[0].set(title='RMS of every Block\'s output (EDM2 keeps it about 1)', xlabel='training images (thousands)', ylabel='RMS on the fixed probe batch')
    axes[1].set(title='UC-LoRA update against its base weight', xlabel='training images (thousands)', ylabel="||dW|| / ||W'|| (mean over the batch)")
    axes[2].set(title='Weight rows: largest |RMS - 1| (forced normalisation)', xlabel='training images (thousands)', ylabel='|RMS - 1|, every MPConv and LoRA A, B')
    if not any(series[-1]['lora'] for series in runs.values()):
        axes[1].text(0.5, 0.5, 'no LoRA layers in these runs', ha='center', va='center', transform=axes[1].transAxes)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f'EDM2 magnitudes over training, {PROBE_IMAGES} images of the run\'s data noised at levels from its training distribution (probe seed {PROBE_SEED}, the same for every run)', fontsize=10)
    fig.tight_layout()
    fig.savefig(out + '.partial.png', dpi=110)
    plt.close(fig)
    os.replace(out + '.partial.png', out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('runs', nargs='+', help='EDM2 run folders, e.g. a baseline and its with-lora run')
    parser.add_argument('--out', help='the picture (default: magnitudes.png in the last run folder); its numbers go beside it as .json')
    args = parser.parse_args()
    for folder in args.runs:
        if not os.path.isdir(folder):
            parser.error(f'{folder} is not a folder')
    out = os.path.abspath(args.out or os.path.join(args.runs[-1], 'magnitudes.png'))
    dnnlib, lora_edm2 = load_edm2()
    with interruptible(TOOL, resumes=False):
        try:
            runs = {os.path.basename(os.path.normpath(folder)): measure_run(folder, dnnlib, lora_edm2) for folder in args.runs}
        except (RunError, OSError, KeyError) as err:
            sys.exit(f'{TOOL}: {err}')
        plot(runs, out)
        with open(os.path.splitext(out)[0] + '.json.partial', 'w') as f:
            json.dump(runs, f, indent=1)
        os.replace(os.path.splitext(out)[0] + '.json.partial', os.path.splitext(out)[0] + '.json')
    print(f'{TOOL}: {os.path.relpath(out)} and its .json')


if __name__ == '__main__':
    main()
