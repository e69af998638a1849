"""One paper row on improved-diffusion: train, sample, FID, with its own scripts and the paper's flags.

    python -m tools.paper.iddpm cifar10-uncond --variant=with-lora --gpus=8
    python -m tools.paper.iddpm imagenet64 --variant=only-lora --smoke

The row's flags come from the table of paper rows (tools/paper/rows.py). Each step prints the
command it runs (in vendor/improved-diffusion, or vendor/edm for FID), so it can be rerun by hand.
improved-diffusion trains until stopped: this script stops it once the checkpoint of the paper's
last iteration is written. Re-running the row resumes from the newest model*.pt in the run folder;
finished samples and scores are kept.

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

from tools import ROOT
from tools.paper.rows import flag_value
from tools.paper.steps import dataset_path, fid, newest, parse_row, run_dir, run_step, show_samples, smoke_has_no_fid, synthetic_images

SMOKE_MODEL = ['--image_size', 32, '--num_channels', 32, '--num_res_blocks', 1, '--learn_sigma', True, '--noise_schedule', 'cosine']
SMOKE_TRAIN = ['--batch_size', 4, '--log_interval', 1]
SMOKE_STEPS = 100 # diffusion steps of smoke runs (LoRA: 101, as 4001 in the paper's rows)


def smoke_variant_flags(flags):
    """The row's variant flags with its 4000 / 4001 diffusion steps scaled down to 100 / 101."""
    steps = int(flag_value(flags, '--diffusion_steps'))
    index = flags.index('--diffusion_steps')
    return flags[:index + 1] + [SMOKE_STEPS + steps % 1000] + flags[index + 2:]


def main():
    parser, args, row = parse_row(__doc__, 'iddpm', gpus_help='MPI processes (one per GPU): mpiexec -n GPUS',
                                  train_flags_help='extra image_train.py flags, e.g. "--microbatch 32"')
    folder = run_dir(args, row)
    launcher = [sys.executable] if args.gpus == 1 else [os.path.join(os.path.dirname(sys.executable), 'mpiexec'), '-n', args.gpus, sys.executable]
    class_flags = ['--class_cond', True, '--num_classes', 10] if '--class_cond' in row.recipe.flags else []
    if args.smoke:
        data = synthetic_images(os.path.join(folder, 'synthetic-32x32'), count=16, resolution=32)
        model_flags = SMOKE_MODEL + class_flags + smoke_variant_flags(list(row.variant_flags))
        train_flags, iterations, save_interval = SMOKE_TRAIN, 2, 2
    else:
        data = dataset_path(args, row)
        batch = int(flag_value(row.recipe.train_flags, '--batch_size'))
        if batch % args.gpus:
            parser.error(f'the paper\'s batch of {batch} does not split evenly over {args.gpus} processes')
        # The table's batch is global; image_train.py's --batch_size is per MPI process.
        train_flags = ['--lr', flag_value(row.recipe.train_flags, '--lr'), '--batch_size', batch // args.gpus]
        model_flags, iterations, save_interval = row.flags, row.recipe.iterations, 50000
    train_flags = train_flags + ['--save_interval', save_interval] + shlex.split(args.train_flags)

    # Train, or continue training, until the checkpoint of the last iteration exists.
    final = os.path.join(folder, f'opt{iterations:06d}.pt')
    latest = newest(os.path.join(folder, 'model*.pt'))
    if os.path.exists(final):
        print(f'training: done ({os.path.relpath(final, ROOT)})')
    else:
        resume = ['--resume_checkpoint', latest] if latest else []
        command = launcher + ['scripts/image_train.py', '--data_dir', data, *model_flags, *train_flags, *resume]
        run_step(command, 'improved-diffusion', dry_run=args.dry_run, env=dict(OPENAI_LOGDIR=folder), stop_when=lambda: os.path.exists(final))

    # Sample from the EMA weights at the full number of steps.
    ema = os.path.join(folder, f'ema_0.9999_{iterations:06d}.pt')
    samples_dir = os.path.join(folder, f'samples-{iterations:06d}')
    num_samples, batch = (8, 8) if args.smoke else (row.recipe.fid_images, 256)
    if not glob.glob(os.path.join(samples_dir, 'samples_*.npz')):
        run_step(launcher + ['scripts/image_sample.py', '--model_path', ema, *model_flags, '--num_samples', num_samples, '--batch_size', batch],
                 'improved-diffusion', dry_run=args.dry_run, env=dict(OPENAI_LOGDIR=samples_dir))
    pngs = os.path.join(samples_dir, 'png')
    if not args.dry_run:
        npz = glob.glob(os.path.join(samples_dir, 'samples_*.npz'))[0]
        show_samples(np.load(npz)['arr_0'], os.path.join(folder, 'samples.png'),
                     f'{row.name}: the first samples of {os.path.basename(ema)}, all {flag_value(model_flags, "--diffusion_steps")} steps', args.smoke)
        if not args.smoke:
            subprocess.run([sys.executable, '-m', 'tools.data.image_folder', 'npz', npz, pngs], cwd=ROOT, check=True)

    if args.smoke:
        return smoke_has_no_fid()
    fid(folder, pngs, row, f'{os.path.basename(ema)}, {num_samples // 1000}k samples at full steps', [sys.executable], args.dry_run)


if __name__ == '__main__':
    main()
