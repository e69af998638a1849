#!/usr/bin/env python3
"""One paper row on improved-diffusion: train, sample, FID, with its own scripts and the paper's flags.

    python tools/iddpm_paper.py cifar10-uncond --variant=with-lora --gpus=8
    python tools/iddpm_paper.py imagenet64 --variant=only-lora --smoke

Each step prints the command it runs (in vendor/improved-diffusion, or vendor/edm for FID), so it
can be rerun by hand. improved-diffusion trains until stopped: this script stops it once the
checkpoint of the paper's last iteration is written. Re-running the row resumes from the newest
model*.pt in the run folder; finished samples and scores are kept.

FID: the 50,000 samples (.npz, at the full 4000 / 4001 steps) become PNGs and go through EDM's
fid.py with EDM's published reference statistics: the same Inception tool as the EDM rows.
--smoke runs the same steps on the CPU at tiny size on a synthetic image folder, without FID.
"""

import glob
import os
import shlex
import subprocess
import sys

import numpy as np

from runs import ROOT, edm_fid, newest, paper_row_parser, run_step, save_grid

CDN = 'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs'

# Paper Appendix A.2 (improved-diffusion's README flags): model flags go to both scripts, training
# flags to image_train.py only (Adam, lr 1e-4, batch 128, EMA 0.9999 by default).
CIFAR10 = ['--image_size', 32, '--num_channels', 128, '--num_res_blocks', 3, '--learn_sigma', True, '--dropout', 0.3, '--noise_schedule', 'cosine']
LEARNING_RATE, BATCH = 1e-4, 128 # BATCH is global: image_train.py's --batch_size is per MPI process
ROWS = {
    'cifar10-uncond': dict(data='datasets/cifar10-train', make_data='data-cifar10-folder', model=CIFAR10,
        iterations=500000, ref=f'{CDN}/cifar10-32x32.npz'),
    'cifar10-cond': dict(data='datasets/cifar10-train', make_data='data-cifar10-folder', model=CIFAR10 + ['--class_cond', True, '--num_classes', 10],
        iterations=500000, ref=f'{CDN}/cifar10-32x32.npz'),
    'imagenet64': dict(data='datasets/imagenet64-train', make_data='data-imagenet64 IMAGENET64_ZIPS=...',
        model=['--image_size', 64, '--num_channels', 128, '--num_res_blocks', 3, '--learn_sigma', True, '--dropout', 0.0, '--noise_schedule', 'cosine'],
        iterations=1500000, ref=f'{CDN}/imagenet-64x64.npz'),
}
VARIANTS = ['baseline', 'only-lora', 'with-lora']
SMOKE_MODEL = ['--image_size', 32, '--num_channels', 32, '--num_res_blocks', 1, '--learn_sigma', True, '--noise_schedule', 'cosine']
SMOKE_TRAIN = ['--batch_size', 4, '--log_interval', 1]


def variant_flags(row, variant, smoke):
    """Time steps and LoRA flags: the baseline uses 4000 steps, LoRA 4001 (paper Appendix A.4)."""
    steps = 100 if smoke else 4000
    if variant == 'baseline':
        return ['--diffusion_steps', steps]
    flags = ['--diffusion_steps', steps + 1, '--time_lora', True, '--lora_bases', 11, '--lora_rank', 4]
    if '--class_cond' in ROWS[row]['model']:
        flags += ['--class_lora', True]
    if variant == 'only-lora':
        flags += ['--conv_cond', False]
    return flags


def main():
    parser = paper_row_parser(__doc__, ROWS, VARIANTS, gpus_help='MPI processes (one per GPU): mpiexec -n GPUS',
                              train_flags_help='extra image_train.py flags, e.g. "--microbatch 32"')
    args = parser.parse_args()
    if args.gpus < 1:
        parser.error('--gpus must be at least 1')
    if not os.path.isdir(os.path.join(ROOT, 'vendor', 'improved-diffusion')):
        sys.exit('iddpm_paper: vendor/improved-diffusion is missing; run `make vendor` first')

    row = ROWS[args.row]
    run_dir = os.path.join(args.runs, f'iddpm-{args.row}-{args.variant}' + ('-smoke' if args.smoke else ''))
    os.makedirs(run_dir, exist_ok=True)
    launcher = [sys.executable] if args.gpus == 1 else [os.path.join(os.path.dirname(sys.executable), 'mpiexec'), '-n', args.gpus, sys.executable]
    class_flags = ['--class_cond', True, '--num_classes', 10] if '--class_cond' in row['model'] else []
    if args.smoke:
        data = os.path.join(run_dir, 'synthetic-32x32')
        if not os.path.isdir(data):
            subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'synthetic_data.py'), '--out', data, '--count', '16', '--resolution', '32'], check=True)
        model_flags, train_flags, iterations, save_interval = SMOKE_MODEL + class_flags, SMOKE_TRAIN, 2, 2
    else:
        data = os.path.join(ROOT, row['data'])
        if not os.path.isdir(data) and not args.dry_run:
            sys.exit(f'iddpm_paper: {row["data"]} is missing; run `make {row["make_data"]}` first')
        if BATCH % args.gpus:
            parser.error(f'the paper\'s batch of {BATCH} does not split evenly over {args.gpus} processes')
        train_flags = ['--lr', LEARNING_RATE, '--batch_size', BATCH // args.gpus]
        model_flags, iterations, save_interval = row['model'], row['iterations'], 50000
    model_flags = model_flags + variant_flags(args.row, args.variant, args.smoke)
    train_flags = train_flags + ['--save_interval', save_interval] + shlex.split(args.train_flags)

    # Train, or continue training, until the checkpoint of the last iteration exists.
    final = os.path.join(run_dir, f'opt{iterations:06d}.pt')
    latest = newest(os.path.join(run_dir, 'model*.pt'))
    if os.path.exists(final):
        print(f'training: done ({os.path.relpath(final, ROOT)})')
    else:
        resume = ['--resume_checkpoint', latest] if latest else []
        command = launcher + ['scripts/image_train.py', '--data_dir', data, *model_flags, *train_flags, *resume]
        run_step(command, 'improved-diffusion', dry_run=args.dry_run, env=dict(OPENAI_LOGDIR=run_dir), stop_when=lambda: os.path.exists(final))

    # Sample from the EMA weights at the full number of steps.
    ema = os.path.join(run_dir, f'ema_0.9999_{iterations:06d}.pt')
    samples_dir = os.path.join(run_dir, f'samples-{iterations:06d}')
    num_samples, batch = (8, 8) if args.smoke else (50000, 256)
    if not glob.glob(os.path.join(samples_dir, 'samples_*.npz')):
        run_step(launcher + ['scripts/image_sample.py', '--model_path', ema, *model_flags, '--num_samples', num_samples, '--batch_size', batch],
                 'improved-diffusion', dry_run=args.dry_run, env=dict(OPENAI_LOGDIR=samples_dir))
    if args.dry_run:
        if not args.smoke:
            run_step([sys.executable, 'fid.py', 'calc', f'--images={samples_dir}/png', f'--ref={row["ref"]}', '--num=50000'], 'edm', dry_run=True)
        return
    npz = glob.glob(os.path.join(samples_dir, 'samples_*.npz'))[0]
    save_grid(np.load(npz)['arr_0'], os.path.join(run_dir, 'samples.png'))

    if args.smoke:
        print('FID: skipped in smoke runs (fid.py downloads Inception-v3; the tests cover its plumbing)')
        return
    pngs = os.path.join(samples_dir, 'png')
    subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'image_folder.py'), 'npz', npz, pngs], check=True)
    edm_fid(os.path.join(run_dir, 'fid.txt'), pngs, row['ref'], f'{os.path.basename(ema)}, 50k samples at full steps', [sys.executable])

if __name__ == '__main__':
    main()
