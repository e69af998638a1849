#!/usr/bin/env python3
"""One paper row on EDM: train, generate, FID, with EDM's own CLIs and the paper's flags.

    python tools/edm_paper.py cifar10-uncond --variant=with-lora --gpus=8
    python tools/edm_paper.py ffhq64 --variant=only-lora --smoke

Each step prints the command it runs (in vendor/edm), so it can be rerun by hand. Re-running the
same row continues where it stopped: training resumes from the newest training-state-*.pt in the
run folder, generation and FID are skipped once their outputs exist.

--smoke runs the same steps on the CPU at tiny size: a synthetic dataset in EDM's zip format, a
tiny DDPM++, 1 kimg of training, 16 images, no FID (fid.py downloads Inception-v3 at run time).
"""

import glob
import os
import shlex
import subprocess
import sys

import numpy as np
import PIL.Image

from runs import ROOT, edm_fid, newest, number_in_name, paper_row_parser, run_step, save_grid

EDM = os.path.join(ROOT, 'vendor', 'edm')
CDN = 'https://nvlabs-fi-cdn.nvidia.com/edm'

# Paper Appendix A.3 and EDM's README; EDM's defaults (lr, dropout 0.13, augment 0.12, 200 Mimg) otherwise.
ROWS = {
    'cifar10-uncond': dict(data='datasets/cifar10-32x32.zip', make_data='data-cifar10', bases=18, steps=18, ref=f'{CDN}/fid-refs/cifar10-32x32.npz',
        pretrained=f'{CDN}/pretrained/edm-cifar10-32x32-uncond-vp.pkl',
        flags=['--cond=0', '--arch=ddpmpp', '--batch=512']),
    'cifar10-cond': dict(data='datasets/cifar10-32x32.zip', make_data='data-cifar10', bases=18, steps=18, ref=f'{CDN}/fid-refs/cifar10-32x32.npz',
        pretrained=f'{CDN}/pretrained/edm-cifar10-32x32-cond-vp.pkl',
        flags=['--cond=1', '--arch=ddpmpp', '--batch=512']),
    'ffhq64': dict(data='datasets/ffhq-64x64.zip', make_data='data-ffhq FFHQ_ZIP=...', bases=20, steps=40, ref=f'{CDN}/fid-refs/ffhq-64x64.npz',
        pretrained=f'{CDN}/pretrained/edm-ffhq-64x64-uncond-vp.pkl',
        flags=['--cond=0', '--arch=ddpmpp', '--batch=256', '--cres=1,2,2,2', '--lr=2e-4', '--dropout=0.05', '--augment=0.15']),
}
VARIANTS = ['baseline', 'only-lora', 'with-lora', 'pretrained']
SMOKE_FLAGS = ['--cbase=8', '--cres=1,1', '--batch=16', '--duration=0.001', '--tick=1', '--snap=1', '--dump=1', '--workers=1', '--seed=0']


DRY_RUN = False # --dry-run: print the commands only


def launcher(gpus):
    return [sys.executable] if gpus == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={gpus}']


def run(command, gpus):
    """Run an EDM script in vendor/edm under python or torchrun; return its output."""
    return run_step(launcher(gpus) + command, 'edm', dry_run=DRY_RUN)


def lora_flags(row, variant):
    if variant == 'baseline':
        return []
    flags = ['--lora=uc', f'--lora-bases={ROWS[row]["bases"]}', '--lora-rank=4']
    if variant == 'only-lora':
        flags.append('--conv-cond=False')
    if variant == 'pretrained':
        flags.append(f'--transfer={ROWS[row]["pretrained"]}')
    return flags


def smoke_dataset(run_dir):
    """A synthetic 16x16 dataset written by EDM's own dataset_tool.py."""
    data = os.path.join(run_dir, 'synthetic-16x16.zip')
    if not os.path.exists(data):
        images = os.path.join(run_dir, 'synthetic-images')
        subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'synthetic_data.py'), '--out', images, '--count', '64'], check=True)
        run(['dataset_tool.py', f'--source={images}', f'--dest={data}'], gpus=1)
    return data


def sample_grid(image_dir, out_path, count=16):
    paths = sorted(glob.glob(os.path.join(image_dir, '**', '*.png'), recursive=True))[:count]
    save_grid(np.stack([np.asarray(PIL.Image.open(p).convert('RGB')) for p in paths]), out_path)


def main():
    parser = paper_row_parser(__doc__, ROWS, VARIANTS, gpus_help='processes (GPUs) per node for torchrun',
                              train_flags_help='extra train.py flags, e.g. "--duration=50 --batch-gpu=64"')
    args = parser.parse_args()
    global DRY_RUN
    DRY_RUN = args.dry_run
    if args.gpus < 1:
        parser.error('--gpus must be at least 1')
    if not os.path.isdir(EDM):
        sys.exit('edm_paper: vendor/edm is missing; run `make vendor` first')
    if args.smoke and args.variant == 'pretrained':
        parser.error('--variant=pretrained downloads EDM\'s published network; it has no smoke version')

    row = ROWS[args.row]
    run_dir = os.path.join(args.runs, f'edm-{args.row}-{args.variant}' + ('-smoke' if args.smoke else ''))
    os.makedirs(run_dir, exist_ok=True)
    if args.smoke:
        data = smoke_dataset(run_dir)
        train_flags = row['flags'] + SMOKE_FLAGS
    else:
        data = os.path.join(ROOT, row['data'])
        if not os.path.isfile(data) and not args.dry_run:
            sys.exit(f'edm_paper: {row["data"]} is missing; run `make {row["make_data"]}` first')
        train_flags = list(row['flags'])
    train_flags += lora_flags(args.row, args.variant) + shlex.split(args.train_flags)

    # Train, or continue training from the newest state dump.
    duration = [float(flag.split('=', 1)[1]) for flag in train_flags if flag.startswith('--duration=')]
    total_kimg = max(int((duration[-1] if duration else 200) * 1000), 1) # as train.py computes it
    state = newest(os.path.join(run_dir, 'training-state-*.pt'))
    if state and number_in_name(state) >= total_kimg:
        print(f'training: done ({os.path.relpath(state, ROOT)} reached {total_kimg} kimg)')
    else:
        resume = [f'--resume={state}'] if state else []
        if resume: # the state holds the transferred base already
            train_flags = [flag for flag in train_flags if not flag.startswith('--transfer')]
        run(['train.py', f'--outdir={run_dir}', '--nosubdir', f'--data={data}'] + train_flags + resume, args.gpus)

    # Generate with EDM's Heun sampler at the paper's step count, from the newest snapshot.
    snapshot = newest(os.path.join(run_dir, 'network-snapshot-*.pkl'))
    if args.dry_run:
        snapshot = snapshot or os.path.join(run_dir, f'network-snapshot-{total_kimg:06d}.pkl')
    samples = os.path.join(run_dir, 'samples-' + os.path.basename(snapshot)[len('network-snapshot-'):-len('.pkl')])
    seeds, steps = ('0-15', 4) if args.smoke else ('0-49999', row['steps'])
    if not os.path.exists(os.path.join(samples, 'done')):
        run(['generate.py', f'--network={snapshot}', f'--outdir={samples}', f'--seeds={seeds}', '--subdirs', f'--steps={steps}', '--batch=64'], args.gpus)
        if args.dry_run:
            if not args.smoke:
                run(['fid.py', 'calc', f'--images={samples}', f'--ref={row["ref"]}', '--num=50000'], args.gpus)
            return
        open(os.path.join(samples, 'done'), 'w').close()
    sample_grid(samples, os.path.join(run_dir, 'samples.png'))

    # FID against EDM's published reference statistics.
    if args.smoke:
        print('FID: skipped in smoke runs (fid.py downloads Inception-v3; the tests cover its plumbing)')
        return
    edm_fid(os.path.join(run_dir, 'fid.txt'), samples, row['ref'], f'{os.path.basename(snapshot)}, NFE {2 * steps - 1}, 50k images', launcher(args.gpus))

if __name__ == '__main__':
    main()
