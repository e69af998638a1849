"""One paper row on EDM: train, generate, FID, with EDM's own CLIs and the paper's flags.

    python -m tools.paper.edm cifar10-uncond --variant=with-lora --gpus=8
    python -m tools.paper.edm ffhq64 --variant=only-lora --smoke

The row's flags come from the table of paper rows (tools/paper/rows.py). Each step prints the
command it runs (in vendor/edm), so it can be rerun by hand. Re-running the same row continues
where it stopped: training resumes from the newest training-state-*.pt in the run folder,
generation and FID are skipped once their outputs exist.

--smoke runs the same steps on the CPU at tiny size: a synthetic dataset in EDM's zip format, a
tiny DDPM++, 1 kimg of training, 16 images, no FID (fid.py downloads Inception-v3 at run time).
Rows that start from EDM's published network (--transfer: pretrained, finetune) start, in smoke
runs, from the tiny network of the recipe's smoke baseline, which is trained first if need be.
"""

import glob
import os
import shlex
import subprocess
import sys

import numpy as np
import PIL.Image

from tools import ROOT
from tools.paper.rows import find, flag_value
from tools.paper.steps import dataset_path, fid, newest, number_in_name, parse_row, run_dir, run_step, show_samples, smoke_has_no_fid, synthetic_images

SMOKE_FLAGS = ['--cbase=8', '--cres=1,1', '--batch=16', '--duration=0.001', '--tick=1', '--snap=1', '--dump=1', '--workers=1', '--seed=0']


def launcher(gpus):
    return [sys.executable] if gpus == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={gpus}']


def smoke_dataset(run_dir, dry_run):
    """A synthetic 16x16 dataset in EDM's zip format, written by EDM's own dataset_tool.py."""
    data = os.path.join(run_dir, 'synthetic-16x16.zip')
    if not os.path.exists(data):
        images = synthetic_images(os.path.join(run_dir, 'synthetic-images'), count=64, resolution=16)
        run_step([sys.executable, 'dataset_tool.py', f'--source={images}', f'--dest={data}'], 'edm', dry_run=dry_run)
    return data


def smoke_base(args, row):
    """The tiny network a smoke run transfers from instead of EDM's published one: the newest snapshot
    of the recipe's smoke baseline, whose run is made first if it has none."""
    baseline = find('edm', row.dataset, 'baseline')
    pattern = os.path.join(run_dir(args, baseline), 'network-snapshot-*.pkl')
    if newest(pattern) is None:
        command = [sys.executable, '-m', 'tools.paper.edm', row.dataset, '--variant=baseline', '--smoke', f'--runs={args.runs}']
        print(f'\n{row.name}: the smoke run starts from the smoke baseline\'s network; making it first', flush=True)
        print(f'$ {shlex.join(command)}', flush=True)
        if args.dry_run:
            return pattern.replace('*', '000001') # the snapshot the baseline's 1 kimg would write
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            sys.exit(f'{row.name}: the smoke baseline failed; see its output above')
    return newest(pattern)


def main():
    parser, args, row = parse_row(__doc__, 'edm', gpus_help='processes (GPUs) per node for torchrun',
                                  train_flags_help='extra train.py flags, e.g. "--duration=50 --batch-gpu=64"')
    run = lambda command: run_step(launcher(args.gpus) + command, 'edm', dry_run=args.dry_run)

    folder = run_dir(args, row)
    if args.smoke:
        data = smoke_dataset(folder, args.dry_run)
        variant_flags = list(row.variant_flags)
        if flag_value(variant_flags, '--transfer') is not None:
            variant_flags = [flag for flag in variant_flags if not flag.startswith('--transfer')] + [f'--transfer={smoke_base(args, row)}']
        train_flags = list(row.recipe.flags) + SMOKE_FLAGS + variant_flags
    else:
        data = dataset_path(args, row)
        train_flags = row.flags
    train_flags += shlex.split(args.train_flags)

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

    # Generate with EDM's Heun sampler at the paper's NFE (2 steps - 1), from the newest snapshot.
    snapshot = newest(os.path.join(folder, 'network-snapshot-*.pkl'))
    if args.dry_run:
        snapshot = snapshot or os.path.join(folder, f'network-snapshot-{total_kimg:06d}.pkl')
    samples = os.path.join(folder, 'samples-' + os.path.basename(snapshot)[len('network-snapshot-'):-len('.pkl')])
    count, steps = (16, 4) if args.smoke else (row.recipe.fid_images, (row.nfe + 1) // 2)
    if not os.path.exists(os.path.join(samples, 'done')):
        run(['generate.py', f'--network={snapshot}', f'--outdir={samples}', f'--seeds=0-{count - 1}', '--subdirs', f'--steps={steps}', '--batch=64'])
        if not args.dry_run:
            open(os.path.join(samples, 'done'), 'w').close()
    if not args.dry_run:
        paths = sorted(glob.glob(os.path.join(samples, '**', '*.png'), recursive=True))[:16]
        show_samples(np.stack([np.asarray(PIL.Image.open(p).convert('RGB')) for p in paths]), os.path.join(folder, 'samples.png'),
                     f'{row.name}: seeds 0-{len(paths) - 1} of {os.path.basename(snapshot)}, EDM\'s Heun sampler, NFE {2 * steps - 1}', args.smoke)

    # FID against EDM's published reference statistics.
    if args.smoke:
        return smoke_has_no_fid()
    fid(folder, samples, row, f'{os.path.basename(snapshot)}, NFE {2 * steps - 1}, {count // 1000}k images', launcher(args.gpus), args.dry_run)


if __name__ == '__main__':
    main()
