"""Paper Fig. 5 (Section 5.6, Appendix C): class vectors a network never saw in training.

    python -m tools.figures.class_grid                # newest snapshots of the CIFAR-10 cond baseline and ClassLoRA runs
    python -m tools.figures.class_grid --smoke        # the same from their smoke runs
    python -m tools.figures.class_grid --nets A.pkl B.pkl --names scale-and-shift ClassLoRA --classes airplane horse

Both networks are trained on one-hot class vectors. The grid feeds them the interpolation
(1 - lambda) c_a + lambda c_b for lambda from 0 to 1, and the scaled vector alpha c_b for alpha
from -1 to beyond 1 (Appendix C strengthens the class input above 1). One row per network and
seed, one column per lambda or alpha; every picture of a row starts from the same latent (its seed, as generate.py draws it), so
only the class vector changes along a row. Sampling calls EDM's own sampler function from
generate.py (Heun, deterministic) with the class vectors, as generate.py takes one class index only.
"""

import argparse
import os
import pickle
import sys

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from tools import ROOT
from tools.data.image_folder import CIFAR10_CLASSES
from tools.figures.images import SMOKE_CAPTION, tile, with_caption
from tools.paper.rows import find, run_folder
from tools.scoring.records import newest
from tools.scoring.upstreams import EDM
from tools.vendoring.run import interruptible
from tools.vendoring.upstream import import_vendor_tree

DEFAULT_VARIANTS = {'baseline': 'scale-and-shift', 'classlora': 'ClassLoRA'} # the two class-conditional CIFAR-10 runs of Fig. 5


def parse_numbers(text):
    return [float(value) for value in text.split(',')]


def class_index(name, label_dim, digits=False):
    """A class given by CIFAR-10 name (not for digits) or by index."""
    names = CIFAR10_CLASSES if label_dim == len(CIFAR10_CLASSES) and not digits else []
    if name in names:
        return names.index(name)
    if name.isdigit() and int(name) < label_dim:
        return int(name)
    raise ValueError(f'unknown class "{name}" (choose from {", ".join(names) or f"0 to {label_dim - 1}"})')


def class_name(index, label_dim, digits=False):
    if digits:
        return f'digit {index}'
    return CIFAR10_CLASSES[index] if label_dim == len(CIFAR10_CLASSES) else f'class {index}'


def default_nets(args):
    """The newest snapshots of the two runs of Fig. 5, or an error that names the make command writing them."""
    nets = []
    for variant in DEFAULT_VARIANTS:
        row = find('edm', 'cifar10-cond', variant)
        folder = run_folder(args.runs, row, args.smoke)
        snapshot = newest(os.path.join(folder, EDM.snapshot_pattern))
        if snapshot is None:
            sys.exit(f'class_grid: no snapshot in {os.path.relpath(folder, ROOT)}; run '
                     f'`make edm-cifar-cond VARIANT={variant}{" SMOKE=1" if args.smoke else ""}` first')
        nets.append(snapshot)
    return nets


def load_network(path):
    if not os.path.isfile(path):
        sys.exit(f'class_grid: {path}: no such file')
    with open(path, 'rb') as f:
        net = pickle.load(f)['ema'].eval().requires_grad_(False).to('cpu')
    if not net.label_dim:
        sys.exit(f'class_grid: {path} is not class-conditional (label_dim 0): Fig. 5 needs a network trained with classes')
    return net


def sample(net, seed, class_vectors, steps):
    """One image per class vector, all from the latent of `seed`: [N, H, W, C] uint8, as generate.py writes them."""
    from generate import StackedRandomGenerator, edm_sampler
    count = len(class_vectors)
    latents = StackedRandomGenerator('cpu', [seed]).randn([1, net.img_channels, net.img_resolution, net.img_resolution]).repeat(count, 1, 1, 1)
    with torch.no_grad():
        images = edm_sampler(net, latents, torch.as_tensor(np.array(class_vectors), dtype=torch.float32), num_steps=steps)
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def panel(title, column_labels, row_labels, rows, scale, font):
    """One labelled grid: `rows` [R][C, H, W, 3] uint8, a label left of each row, one above each column."""
    grid = PIL.Image.fromarray(tile(np.concatenate(rows), columns=len(column_labels), gap=1))
    grid = grid.resize([grid.width * scale, grid.height * scale], PIL.Image.NEAREST)
    cell = rows[0].shape[1] * scale + scale # an image and its gap
    line = font.size + 4
    left = max(int(font.getlength(text)) for label in row_labels for text in label.split('\n')) + 12
    top = 2 * line + max(len(label.split('\n')) for label in column_labels) * line + 6
    picture = PIL.Image.new('RGB', [left + grid.width, top + grid.height], 'white')
    draw = PIL.ImageDraw.Draw(picture)
    draw.text((4, 4), title, fill='black', font=font)
    for column, label in enumerate(column_labels):
        for i, text in enumerate(label.split('\n')):
            x = left + column * cell + (cell - scale - font.getlength(text)) / 2
            draw.text((x, 2 * line + i * line), text, fill='black', font=font)
    for row, label in enumerate(row_labels):
        lines = label.split('\n')
        y = top + row * cell + (cell - len(lines) * line) / 2
        for i, text in enumerate(lines):
            draw.text((6, y + i * line), text, fill='black', font=font)
    picture.paste(grid, (left, top))
    return picture


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--nets', nargs='+', metavar='PKL', help='network snapshots (default: the newest of the CIFAR-10 cond baseline and ClassLoRA runs)')
    parser.add_argument('--names', nargs='+', help='a row label a network (default: scale-and-shift, ClassLoRA; or the file names)')
    parser.add_argument('--classes', nargs=2, metavar=('A', 'B'), help='c_a and c_b, by CIFAR-10 name or index (default: the paper\'s airplane and horse; digits: 1 and 7)')
    parser.add_argument('--digits', action='store_true', help='networks of the mini digits (make mini): classes are digits')
    parser.add_argument('--lambdas', type=parse_numbers, default=parse_numbers('0,0.125,0.25,0.375,0.5,0.625,0.75,0.875,1'), help='interpolation weights lambda')
    parser.add_argument('--scales', type=parse_numbers, default=parse_numbers('-1,-0.75,-0.5,-0.25,0,0.25,0.5,0.75,1,1.5,2'), help='scales alpha of c_b (write --scales=-1,0,1: a leading minus sign needs the =)')
    parser.add_argument('--seeds', type=lambda text: [int(s) for s in text.split(',')], default=[0, 1], help='latent seeds, a row each (default: 0,1)')
    parser.add_argument('--steps', type=int, default=18, help='Heun steps (18: NFE 35, the paper\'s CIFAR-10 sampler)')
    parser.add_argument('--smoke', action='store_true', help='default networks from the smoke runs')
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs'), help='where the run folders are')
    parser.add_argument('--out', help='PNG to write (default: runs/edm-cifar10-cond-class-grid[-smoke].png)')
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.nets or DEFAULT_VARIANTS):
        parser.error('--names needs one name a network')
    if args.steps < 2:
        parser.error('--steps must be at least 2')

    args.classes = args.classes or (['1', '7'] if args.digits else ['airplane', 'horse'])
    nets = args.nets or default_nets(args)
    names = args.names or (list(DEFAULT_VARIANTS.values()) if not args.nets else [os.path.basename(path) for path in nets])
    out = args.out or os.path.join(args.runs, 'edm-cifar10-cond-class-grid' + ('-smoke' if args.smoke else '') + '.png')
    import_vendor_tree('edm', 'class_grid')

    interpolation, scaling, shapes = [], [], set()
    for path, name in zip(nets, names):
        net = load_network(path)
        shapes.add((net.img_channels, net.img_resolution, net.label_dim))
        if len(shapes) > 1: # one grid needs images of one size and one set of classes
            parser.error(f'{path}: {net.img_channels}x{net.img_resolution}x{net.img_resolution} images, {net.label_dim} classes, unlike the networks before it')
        try:
            a, b = [class_index(c, net.label_dim, args.digits) for c in args.classes]
        except ValueError as err:
            parser.error(str(err))
        eye = np.eye(net.label_dim, dtype=np.float32)
        for seed in args.seeds:
            print(f'class_grid: {name} ({os.path.relpath(path)}), seed {seed}: {len(args.lambdas) + len(args.scales)} samples', flush=True)
            interpolation.append(sample(net, seed, [(1 - l) * eye[a] + l * eye[b] for l in args.lambdas], args.steps))
            scaling.append(sample(net, seed, [s * eye[b] for s in args.scales], args.steps))
    names_a_b = [class_name(i, net.label_dim, args.digits) for i in (a, b)]

    font = PIL.ImageFont.load_default(size=14)
    scale = max(1, 96 // interpolation[0].shape[1])
    row_labels = [f'{name}\nseed {seed}' for name in names for seed in args.seeds]
    lambdas = [f'lambda={l:g}' + (f'\n{names_a_b[0]}' if l == 0 else f'\n{names_a_b[1]}' if l == 1 else '') for l in args.lambdas]
    scales = [f'alpha={s:g}' + (f'\n{names_a_b[1]}' if s == 1 else '') for s in args.scales]
    panels = [panel(f'Interpolation: (1 - lambda) c_{names_a_b[0]} + lambda c_{names_a_b[1]}', lambdas, row_labels, interpolation, scale, font),
              panel(f'Scaling: alpha c_{names_a_b[1]} (training saw alpha = 1 only)', scales, row_labels, scaling, scale, font)]
    figure = PIL.Image.new('RGB', [max(p.width for p in panels), sum(p.height for p in panels) + 16], 'white')
    figure.paste(panels[0], (0, 0))
    figure.paste(panels[1], (0, panels[0].height + 16))
    caption = f'Fig. 5{" on the mini digits" if args.digits else ""}: class vectors beyond one-hot. EDM\'s Heun sampler, {args.steps} steps (NFE {2 * args.steps - 1}); same latent along each row.'
    figure = with_caption(figure, f'{caption}\n{SMOKE_CAPTION}' if args.smoke else caption)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.save(out)
    print(f'class_grid: wrote {os.path.relpath(out)}')


if __name__ == '__main__':
    with interruptible('make edm-class-grid', resumes=False): # Ctrl-C: one line, no traceback
        main()
