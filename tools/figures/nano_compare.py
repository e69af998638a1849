"""Paper Fig. 3 on a CPU: nano diffusion on real MNIST with each conditioning, at one equal budget.

    python -m tools.figures.nano_compare [--epochs 25] [--seeds 0 1] [--samples 128] [--out runs/nano-compare] [--clip-x0 all|none|METHOD ...]

Runs vendor/dataflowr/nano.py for: the notebook's scale-and-shift ("shift", with the sinusoidal fix),
shift with the notebook's original embedding (the fix's effect), TimeLoRA with the interpolation
table, TimeLoRA with a random table, and UC-LoRA; same data, epochs, batch, learning rate, seeds and
digit classifier. The reported scores are the notebook's sampler's (DDPM.step); the finished
checkpoints of the --clip-x0 methods (default: all) are also sampled with nano.py --sampler clip-x0
(the predicted clean digit clipped at every step: not the notebook's; one more sampling a run), in
<run>/clip-x0/, and scored in a second table. Writes results.md (tables), results.json,
compare.png (proxy FID per method, loss curves, and a row of samples a method) and
omega_similarity.png (Fig. 4: the LoRA methods' heatmaps side by side), beside each run's own
folder with its per-layer heatmaps (Fig. 7).
Rerunning resumes unfinished runs and reuses finished ones.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import PIL.Image

from tools import ROOT
from tools.figures.composition import Axis, draw
from tools.figures.images import tile, untile
from tools.paper.rows import NANO_ROWS
from tools.vendoring.run import interruptible, run_tool
from tools.vendoring.upstream import import_vendor_tree

NANO = os.path.join(ROOT, 'vendor', 'dataflowr')
METHODS = [(row.variant, row.label, list(row.variant_flags)) for row in NANO_ROWS] # (run name, label, nano.py flags)


def compared(results):
    """The methods of METHODS that `results` holds (--methods), in the table's order."""
    return [method for method in METHODS if method[0] in results]


def two_places(value):
    """A similarity with 2 decimals, and 0.00 for what rounds to it (not -0.00)."""
    text = f'{value:.2f}'
    return '0.00' if text == '-0.00' else text


def run(method_flags, out, args, seed, sampler='notebook', start_from=None):
    """The metrics of nano.py's run in `out`: those it wrote, if scored at this budget with this sampler, or
    those of running it (again: it resumes). start_from: a finished checkpoint to copy in first (for
    sampling another run's network with another sampler)."""
    metrics_path = os.path.join(out, 'metrics.json')
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
        scored = 'proxy_kid' in metrics and (metrics['cond'] == 'shift' or 'omega_similarity_near_at_init' in metrics)
        if metrics['epochs'] == args.epochs and metrics['samples'] == args.samples and metrics.get('sampler') == sampler and scored:
            return metrics
        os.remove(metrics_path) # another budget or an older scoring: train on (resume) and score again
    if start_from:
        os.makedirs(out, exist_ok=True)
        shutil.copyfile(start_from, os.path.join(out, 'checkpoint.pt'))
    command = [sys.executable, 'nano.py', *method_flags, '--epochs', str(args.epochs), '--batch-size', str(args.batch_size),
               '--lr', str(args.lr), '--seed', str(seed), '--data', args.data, '--samples', str(args.samples), '--out', out,
               '--sampler', sampler, '--classifier', os.path.join(args.out, 'digit-classifier.pt')]
    if args.train_digits:
        command += ['--train-digits', str(args.train_digits)]
    print(f'\n[vendor/dataflowr]$ {" ".join(command)}', flush=True)
    if run_tool(command, 'nano_compare', cwd=NANO, env=dict(os.environ, PYTHONPATH=NANO)) != 0:
        sys.exit(f'nano_compare: run failed: {" ".join(command)}')
    with open(metrics_path) as f:
        return json.load(f)


# Below these, a comparison checks the plumbing only (make smoke runs 2 epochs and 2 samples).
SMOKE_EPOCHS, SMOKE_SAMPLES = 5, 16


def figure(results, clipped, args, path):
    """compare.png: proxy FID per method and the loss curves on top, then one row a method with its
    first samples (first seed) large enough to read, de-normalised beside rescaled per digit, and
    (clipped: the clip-x0 sampler's results of some methods, if any) the clipped sampler's de-normalised."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.ticker import MaxNLocator
    columns = min(8, args.samples) # the digits shown a method and view: its first 8 or 16 samples, 8 a row
    rows_shown = min(2, args.samples // columns)
    panel_height = 0.8 * rows_shown + 0.4 # inches: digits 0.8 high (8 a row fill half the width), a title or a gap above
    fig = plt.figure(figsize=(16, 5.5 + panel_height * len(compared(results))), layout='constrained')
    if args.epochs < SMOKE_EPOCHS or args.samples < SMOKE_SAMPLES: # make smoke's budget: say what the picture is for
        fig.suptitle(f'Smoke budget ({args.epochs} epochs, {args.samples} samples): a check that every step runs. '
                     'The samples are noise and the scores mean nothing at this size.', color='tab:red', fontsize=13)
    top, bottom = fig.add_gridspec(2, 1, height_ratios=[5.5, panel_height * len(compared(results))])
    ax_bars, ax_loss = top.subgridspec(1, 2).subplots()
    labels = [label for _, label, _ in compared(results)]
    rows = np.arange(len(compared(results)))
    bars = [(results, 'proxy_fid', 'de-normalised', 'tab:blue'), (results, 'proxy_fid_rescaled', 'rescaled per digit', 'tab:orange')]
    if clipped:
        bars.append((clipped, 'proxy_fid', 'clip-x0 sampler, de-normalised', 'tab:green'))
    height = 0.8 / len(bars)
    for offset, (scored, key, view, color) in enumerate(bars):
        fids = [[m[key] for m in scored[name]] if name in scored else [np.nan] for name, _, _ in compared(results)] # nan: no bar
        ax_bars.barh(rows + height * offset, [np.mean(f) for f in fids], height=height, xerr=[np.std(f) for f in fids], color=color, label=view)
    ax_bars.set_yticks(rows + height * (len(bars) - 1) / 2, labels)
    ax_bars.invert_yaxis()
    ax_bars.set(xlabel='proxy FID (lower is better; bars: mean, whiskers: std over seeds)',
                title=f'{args.epochs} epochs, {len(args.seeds)} seed(s), {args.samples} samples')
    ax_bars.legend(loc='upper center', bbox_to_anchor=(0.5, -0.16), ncol=len(bars), fontsize=9) # below the axis, off the bars
    for name, label, _ in compared(results):
        checkpoint = torch.load(os.path.join(args.out, f'{name}-seed{args.seeds[0]}', 'checkpoint.pt'), map_location='cpu', weights_only=False)
        losses = np.array(checkpoint['losses'])
        window = max(1, len(losses) // args.epochs)
        ax_loss.plot(np.arange(window, len(losses) + 1), np.convolve(losses, np.ones(window) / window, mode='valid'), label=label)
    ax_loss.set(xlabel='optimizer step', ylabel='training loss (mean over the epoch before)', yscale='log', title='training loss (first seed)')
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(fontsize=8)
    views = [('samples.png', 'de-normalised'), ('samples-rescaled.png', 'rescaled per digit')]
    if clipped:
        views.append((os.path.join('clip-x0', 'samples.png'), 'clip-x0 sampler, de-normalised'))
    panels = bottom.subgridspec(len(compared(results)), len(views))
    titled = set() # the views titled already, above their first panel
    for i, (name, label, _) in enumerate(compared(results)):
        for j, (png, view) in enumerate(views):
            ax = fig.add_subplot(panels[i, j])
            if png.startswith('clip-x0') and name not in clipped: # a method left out of --clip-x0
                ax.axis('off')
                continue
            grid = np.asarray(PIL.Image.open(os.path.join(args.out, f'{name}-seed{args.seeds[0]}', png)))
            digits = untile(grid, 64, 64, rows_shown * columns) # 32-pixel digits drawn 2x, 16 a row
            ax.imshow(tile(digits, columns), cmap='gray', vmin=0, vmax=255, interpolation='nearest')
            ax.set_xticks([]), ax.set_yticks([])
            if view not in titled:
                ax.set_title(f'{view} (first {rows_shown * columns} samples, seed {args.seeds[0]})', fontsize=10)
                titled.add(view)
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha='right', va='center', fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def real_digit_floor(args, draws=5):
    """The metrics (proxy FID, KID, ...) of real training digits, as many as the samples, against the held-out
    ones, a dict a draw: the best a method can score with this many samples, and (their spread) the noise of the measure."""
    import_vendor_tree('dataflowr', 'nano_compare')
    import nano_data
    import nano_metrics
    images, labels = nano_data.load_digits(args.data)
    (train_images, train_labels), (held_out_images, held_out_labels) = nano_data.split(images, labels)
    rng = np.random.default_rng(0)
    sets = [train_images[rng.choice(len(train_images), args.samples, replace=False)] for _ in range(draws)]
    return nano_metrics.evaluate(sets, train_images, train_labels, held_out_images, held_out_labels,
                                 os.path.join(args.out, 'digit-classifier.pt'))


def heatmaps(results, args, path):
    """Paper Fig. 4 side by side: each LoRA method's cosine similarity of composition weights between
    time steps, averaged over its layers (first seed; every run's own omega_similarity.png has the layers)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    lora = [(name, label) for name, label, _ in compared(results) if 'omega_similarity_near' in results[name][0]]
    if not lora: # --methods without a LoRA method: no composition weights
        return None
    # At least 7 inches wide: with a single LoRA method, the title's lines still fit.
    fig, axes = plt.subplots(2, len(lora), figsize=(max(7, 5.5 * len(lora)), 9.5), squeeze=False, gridspec_kw=dict(wspace=0.35, hspace=0.3))
    for column, (name, label) in enumerate(lora):
        saved = np.load(os.path.join(args.out, f'{name}-seed{args.seeds[0]}', 'omega_similarity.npz'))
        first = results[name][0]
        for row, (key, when) in enumerate([('mean', f'after {args.epochs} epochs'), ('mean_at_init', 'at initialisation')]):
            ax = axes[row, column]
            image = draw(ax, saved[key], Axis(values=saved['steps'], label='t', log=False, span=1000)) # as the run's own heatmap
            suffix = '' if row == 0 else '_at_init'
            ax.set_title(f'{label}, {when}\nnear {two_places(first["omega_similarity_near" + suffix])}, far {two_places(first["omega_similarity_far" + suffix])}')
    fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02)
    fig.suptitle(f'cosine similarity of composition weights between time steps,\nmean over layers (seed {args.seeds[0]}; '
                 'near: 0 < |t - t\'| <= 50, far: >= 500)')
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--epochs', type=int, default=25, help='epochs for every method (the paper: 100)')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1], help='one run a seed and method; spread is reported')
    parser.add_argument('--samples', type=int, default=128, help='samples a run for the proxy FID')
    parser.add_argument('--data', default='mnist5k')
    parser.add_argument('--train-digits', type=int, help='train on the first N training digits only (quick checks)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'runs', 'nano-compare'))
    parser.add_argument('--methods', nargs='+', choices=[name for name, _, _ in METHODS], default=[name for name, _, _ in METHODS],
                        help='the methods to compare (default: all of Fig. 3)')
    parser.add_argument('--clip-x0', nargs='+', choices=['all', 'none', *[name for name, _, _ in METHODS]], default=['all'],
                        help="the methods whose runs are also sampled with nano.py --sampler clip-x0 (not the notebook's) for a second table")
    args = parser.parse_args()
    if len(args.clip_x0) > 1 and {'all', 'none'} & set(args.clip_x0):
        parser.error('--clip-x0: all, none, or method names')
    if min(args.epochs, args.batch_size, args.samples) < 2:
        parser.error('--epochs, --batch-size and --samples must be at least 2')
    if not os.path.isdir(NANO):
        sys.exit('nano_compare: vendor/dataflowr is missing; run `make vendor` first')
    args.out = os.path.abspath(args.out) # the runs happen in vendor/dataflowr
    os.makedirs(args.out, exist_ok=True)

    results = {name: [run(flags, os.path.join(args.out, f'{name}-seed{seed}'), args, seed) for seed in args.seeds]
               for name, _, flags in METHODS if name in args.methods}
    # The same checkpoints and sampling seeds, the clipped sampler: a copy of each finished checkpoint, resumed in <run>/clip-x0/.
    clip_methods = args.methods if args.clip_x0 == ['all'] else [name for name in args.methods if name in args.clip_x0]
    clipped = {name: [run(flags, os.path.join(args.out, f'{name}-seed{seed}', 'clip-x0'), args, seed, 'clip-x0',
                          start_from=os.path.join(args.out, f'{name}-seed{seed}', 'checkpoint.pt')) for seed in args.seeds]
               for name, _, flags in METHODS if name in clip_methods}
    first = next(iter(results.values()))[0]
    lines = [f'# Nano diffusion on MNIST ({args.data}): conditioning methods at an equal budget', '',
             f'Budget a run: {args.epochs} epochs = {first["optimizer_steps"]} optimizer steps of {args.batch_size} digits '
             f'({first["images_seen"]} digits seen), lr {args.lr}; {args.samples} samples of the notebook\'s 1000-step sampler (DDPM.step); seeds {args.seeds}.',
             f'Proxy FID: {first["proxy_fid_note"]} (classifier test accuracy {first["classifier_test_accuracy"]:.3f} '
             f'on {first["held_out_digits"]} held-out digits). Command: `python -m tools.figures.nano_compare --epochs {args.epochs} '
             f'--seeds {" ".join(map(str, args.seeds))} --samples {args.samples} --out {os.path.relpath(args.out, ROOT)}'
             + (f' --methods {" ".join(results)}' if len(results) < len(METHODS) else '') + '`.', '',
             'Two views of the same samples: de-normalised (x + 1) * 127.5, clamped; and each digit rescaled from its own '
             'minimum to its own maximum, as the notebook\'s plt.imshow shows them (MyTinyUNet cannot see the mean of its '
             'input, so the sampler lets every sample\'s mean drift; "off range": the share of samples whose mean lies '
             'outside the range of real digits\' means, which come out all white or all black when de-normalised).', '',
             '| method | proxy FID, de-normalised (mean ± std) | per seed | proxy FID, rescaled per digit (mean ± std) | per seed | '
             'off range | final loss | trainable params | digit shares 0-9 (rescaled) | omega similarity near / far (at init) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    floor_metrics = real_digit_floor(args)
    floor, floor_kid = [m['proxy_fid'] for m in floor_metrics], [m['proxy_kid'] for m in floor_metrics]
    # The real digits' row opens both tables: its label and proxy FID cells (mean ± std, per draw).
    floor_row = (f'| real training digits ({args.samples} a draw, {len(floor)} draws: the floor and noise of the measure) | '
                 f'{np.mean(floor):.1f} ± {np.std(floor):.1f} | {", ".join(f"{f:.1f}" for f in floor)} | ')
    lines.append(floor_row + '| | | | | | |')
    for name, label, _ in compared(results):
        runs = results[name]
        fids, rescaled = [m['proxy_fid'] for m in runs], [m['proxy_fid_rescaled'] for m in runs]
        shares = np.mean([m['class_shares_rescaled'] for m in runs], axis=0)
        similarity = ', '.join(f'{two_places(m["omega_similarity_near"])} / {two_places(m["omega_similarity_far"])} '
                               f'({two_places(m["omega_similarity_near_at_init"])} / {two_places(m["omega_similarity_far_at_init"])})'
                               for m in runs) if runs[0]['cond'] != 'shift' else '-'
        lines.append(f'| {label} | {np.mean(fids):.1f} ± {np.std(fids):.1f} | {", ".join(f"{f:.1f}" for f in fids)} | '
                     f'{np.mean(rescaled):.1f} ± {np.std(rescaled):.1f} | {", ".join(f"{f:.1f}" for f in rescaled)} | '
                     f'{np.mean([m["off_range_share"] for m in runs]):.2f} | '
                     f'{np.mean([m["final_epoch_loss"] for m in runs]):.4f} | {runs[0]["trainable_parameters"]:,} | '
                     f'{" ".join(f"{s:.2f}" for s in shares)} | {similarity} |')
    if clipped:
        lines += ['', "## The same checkpoints, clipped sampler (nano.py --sampler clip-x0: not the notebook's)", '',
                  'Each run\'s checkpoint sampled again with the same seed, the predicted clean digit x0 clipped to [-1, 1] at '
                  'every step (improved-diffusion\'s clip_denoised), which keeps each sample inside [-1, 1]: the mean drift is '
                  'bounded, not removed (backgrounds range from black to grey, "off range" counts them), and the de-normalised view '
                  'shows the shapes drawn. Proxy KID: unbiased at any sample count (about 0 for real digits).', '',
                  '| method | proxy FID, de-normalised (mean ± std) | per seed | proxy KID, de-normalised (mean ± std) | off range | '
                  'digit shares 0-9 (de-normalised) |', '|---|---|---|---|---|---|',
                  floor_row + f'{np.mean(floor_kid):.1f} ± {np.std(floor_kid):.1f} | | |']
        for name, label, _ in compared(clipped):
            runs = clipped[name]
            fids, kids = [m['proxy_fid'] for m in runs], [m['proxy_kid'] for m in runs]
            shares = np.mean([m['class_shares'] for m in runs], axis=0)
            lines.append(f'| {label} | {np.mean(fids):.1f} ± {np.std(fids):.1f} | {", ".join(f"{f:.1f}" for f in fids)} | '
                         f'{np.mean(kids):.1f} ± {np.std(kids):.1f} | {np.mean([m["off_range_share"] for m in runs]):.2f} | '
                         f'{" ".join(f"{s:.2f}" for s in shares)} |')
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(dict(results, real_digit_floor=floor, real_digit_floor_kid=floor_kid,
                       **{f'{name}-clip-x0': runs for name, runs in clipped.items()}), f, indent=2)
    figure(results, clipped, args, os.path.join(args.out, 'compare.png'))
    drawn = heatmaps(results, args, os.path.join(args.out, 'omega_similarity.png'))
    print('\n'.join(lines))
    print(f'\nwrote {os.path.relpath(args.out, ROOT)}/results.md, results.json, compare.png' + (', omega_similarity.png' if drawn else ''))


if __name__ == '__main__':
    with interruptible('make nano-compare'): # Ctrl-C: one line, no traceback
        main()
