"""One paper row on EDM: train, score every snapshot, show samples, with EDM's own CLIs and the paper's flags.

    python -m tools.drivers.edm cifar10-uncond --variant=with-lora --gpus=8
    python -m tools.drivers.edm ffhq64 --variant=only-lora --smoke

The row's flags come from the table of paper rows (tools/paper/rows.py). Its dataset is checked first
(tools/data/dataset_check.py: a readable zip of images at the row's resolution, 3 channels, and for
--cond=1 rows CIFAR-10's 10 classes in dataset.json); a bad one is refused in one line. Each step prints the
command it runs (in vendor/edm), so it can be rerun by hand. Re-running the same row continues
where it stopped: training resumes from the newest training-state-*.pt in the run folder (written
atomically: patch 0004), and scoring (tools/scoring/score.py) skips what it has recorded and
generates only the images still missing.

--smoke runs the same steps on the CPU at tiny size: a synthetic dataset in EDM's zip format, a
tiny DDPM++, 1 kimg of training, 32 images an FID evaluation with a stand-in detector (fid.py
downloads Inception-v3 at run time).
Rows that start from EDM's published network (--transfer: pretrained, finetune) start, in smoke
runs, from the tiny network of the recipe's smoke baseline, which is trained first if need be.
"""

import os
import shlex
import sys

import numpy as np
import PIL.Image

from tools import ROOT
from tools.data.dataset_check import check_edm_zip, shown
from tools.drivers.steps import dataset_path, parse_row, run_dir
from tools.figures.images import show_samples
from tools.paper.rows import class_names, edm_classes, find, flag_value, override
from tools.scoring.records import best, newest, number_in_name
from tools.scoring.score import score_run, score_snapshot
from tools.scoring.upstreams import EDM
from tools.vendoring.run import run_step, run_tool, working_in

SMOKE_FLAGS = ['--cbase=8', '--cres=1,1', '--batch=16', '--duration=0.001', '--tick=1', '--snap=1', '--dump=1', '--workers=1', '--seed=0']


def smoke_base(args, row):
    """The tiny network a smoke run transfers from instead of EDM's published one: the newest snapshot
    of the recipe's smoke baseline, whose run is made first if it has none."""
    baseline = find('edm', row.dataset, 'baseline')
    pattern = os.path.join(run_dir(args, baseline), EDM.snapshot_pattern)
    if newest(pattern) is None:
        command = [sys.executable, '-m', 'tools.drivers.edm', row.dataset, '--variant=baseline', '--smoke', f'--runs={args.runs}']
        print(f'\n{row.name}: the smoke run starts from the smoke baseline\'s network; making it first', flush=True)
        print(f'$ {shlex.join(command)}', flush=True)
        if args.dry_run:
            return os.path.join(run_dir(args, baseline), EDM.snapshot_name(1)) # what the baseline's 1 kimg would write
        if run_tool(command, row.name) != 0:
            sys.exit(f'{row.name}: the smoke baseline failed; see its output above')
    return newest(pattern)


def published_network(url, dry_run):
    """EDM's published network, downloaded once to downloads/edm-pretrained/ by tools.data.fetch, which
    checks its SHA-256 against the one recorded at the first download (EDM publishes none)."""
    dest = os.path.join(ROOT, 'downloads', 'edm-pretrained', os.path.basename(url))
    command = [sys.executable, '-m', 'tools.data.fetch', 'url', f'--url={url}', f'--dest={dest}']
    print(f'$ {shlex.join(command)}', flush=True)
    if not dry_run and run_tool(command, 'edm') != 0:
        sys.exit(f'edm: could not fetch {url}; see above')
    return dest


def main(argv=None, launcher=None):
    """launcher: the command prefix every step runs under (default: EDM's for --gpus; make kill-check
    runs each step under a killer)."""
    parser, args, row = parse_row(__doc__, 'edm', gpus_help='processes (GPUs) per node for torchrun',
                                  train_flags_help='extra train.py flags, e.g. "--duration=50 --batch-gpu=64"', argv=argv)
    # The dataset is checked before the run folder exists: a refusal leaves nothing behind.
    data = None if args.smoke else dataset_path(args, row, lambda path: check_edm_zip(path, row.recipe.resolution, edm_classes(row)))
    folder = run_dir(args, row)
    with working_in(folder, shown(folder), args.dry_run): # Ctrl-C stops every step; one run a folder
        return run_row(args, row, folder, data, launcher or EDM.launcher(args.gpus))


def run_row(args, row, folder, data, launcher):
    run = lambda command: run_step(launcher + command, EDM.tree, dry_run=args.dry_run)
    if args.smoke:
        data = EDM.smoke_data(folder, args.dry_run)
        variant_flags = list(row.variant_flags)
        if flag_value(variant_flags, '--transfer') is not None:
            variant_flags = [flag for flag in variant_flags if not flag.startswith(('--transfer', '--duration'))] + [f'--transfer={smoke_base(args, row)}']
        train_flags = list(row.recipe.flags) + SMOKE_FLAGS + variant_flags
    else:
        train_flags = [f'--transfer={published_network(row.recipe.pretrained, args.dry_run)}' if flag.startswith('--transfer=') else flag
                       for flag in row.flags]
    train_flags += shlex.split(args.train_flags)
    if args.seed is not None:
        train_flags = list(override(train_flags, (f'--seed={args.seed}',)))

    # Train, or continue training from the newest state dump.
    total_kimg = max(int(float(flag_value(train_flags, '--duration', 200)) * 1000), 1) # as train.py computes it
    state = newest(os.path.join(folder, 'training-state-*.pt'))
    if state and number_in_name(state) >= total_kimg:
        print(f'training: done ({os.path.relpath(state, ROOT)} reached {total_kimg} kimg)')
    else:
        resume = [f'--resume={state}'] if state else []
        if resume: # the state holds the transferred base already
            train_flags = [flag for flag in train_flags if not flag.startswith('--transfer')]
        run(['train.py', f'--outdir={folder}', '--nosubdir', f'--data={data}'] + train_flags + resume)

    # Score every snapshot (tools.scoring.score), then draw samples of the snapshot the row reports.
    protocol = EDM.protocol(row, folder, args.smoke, args.fid_evaluations, args.fid_images, args.dry_run)
    if args.dry_run:
        return score_snapshot(os.path.join(folder, EDM.snapshot_name(total_kimg)), folder, row, protocol, launcher)
    records = score_run(folder, row, protocol, launcher, args.snapshots, args.keep_images)
    sample_grid(folder, row, best(records)['snapshot'], protocol, launcher, args.smoke, EDM, edm_classes(row))


def sample_grid(folder, row, snapshot, protocol, launcher, smoke, upstream, classes):
    """Appendix D: samples of the reported snapshot (EDM's generate.py or EDM2's generate_images.py), samples.png;
    classes > 0: a row of samples a class (0: unconditional, or a random class a seed)."""
    per_class, count = (4, 16) if smoke else (10, 64)
    images = []
    for label in range(classes) if classes else [None]:
        image_dir = os.path.join(folder, f'samples-{upstream.snapshot_number(snapshot):06d}' + (f'/class-{label}' if classes else ''))
        seeds = list(range(per_class if classes else count))
        upstream.generate_seeds(os.path.join(folder, snapshot), image_dir, seeds, protocol, launcher, class_label=label)
        images += [np.asarray(PIL.Image.open(os.path.join(image_dir, f'{seed - seed % 1000:06d}', f'{seed:06d}.png')).convert('RGB'))
                   for seed in seeds]
    what = f'a row a class, seeds 0-{per_class - 1}' if classes else f'seeds 0-{count - 1}'
    show_samples(np.stack(images), os.path.join(folder, 'samples.png'),
                 f'{row.name}: {snapshot} (the best FID of the run), {what}, {protocol["sampler"]} (NFE {protocol["nfe"]})',
                 smoke, count=len(images), columns=per_class if classes else None, row_labels=class_names(row) if classes else None)


if __name__ == '__main__':
    main()
