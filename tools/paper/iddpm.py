"""One paper row on improved-diffusion: train, sample, FID, with its own scripts and the paper's flags.

    python -m tools.paper.iddpm cifar10-uncond --variant=with-lora --gpus=8
    python -m tools.paper.iddpm imagenet64 --variant=only-lora --smoke

The row's flags come from the table of paper rows (tools/paper/rows.py). Each step prints the
command it runs (in vendor/improved-diffusion, or vendor/edm for FID), so it can be rerun by hand.
improved-diffusion trains until stopped: this script stops it once the checkpoint of the paper's
last iteration is written. Re-running the row resumes from the newest step whose checkpoint files
are all there (resumable_checkpoint); finished samples and scores are kept.

Scoring (tools/paper/score.py): every EMA snapshot, 50,000 samples at the full 4000 / 4001 steps
(image_sample.py --sample_dir: batches written as they finish, resumed), scored as PNGs by EDM's
fid.py with EDM's published reference statistics: the same Inception tool as the EDM rows. ImageNet64
is scored against statistics of the user's own downsampled training images (fid.py ref; EDM's
published imagenet-64x64.npz comes from differently preprocessed images).
--smoke runs the same steps on the CPU at tiny size on a synthetic image folder, scored by a stand-in
detector against that folder.
"""

import glob
import os
import re
import shlex
import sys

import numpy as np

from tools import ROOT
from tools.data.image_folder import CIFAR10_CLASSES
from tools.paper.rows import flag_value
from tools.paper.score import SMOKE_IMAGES, best, reference_statistics, score_run, score_snapshot
from tools.paper.steps import dataset_path, number_in_name, parse_row, run_dir, run_step, show_samples, synthetic_images

SMOKE_MODEL = ['--image_size', 32, '--num_channels', 32, '--num_res_blocks', 1, '--learn_sigma', True, '--noise_schedule', 'cosine']
SMOKE_TRAIN = ['--batch_size', 4, '--log_interval', 1]
SMOKE_STEPS = 100 # diffusion steps of smoke runs (LoRA: 101, as 4001 in the paper's rows)


def smoke_variant_flags(flags):
    """The row's variant flags with its 4000 / 4001 diffusion steps scaled down to 100 / 101."""
    steps = int(flag_value(flags, '--diffusion_steps'))
    index = flags.index('--diffusion_steps')
    return flags[:index + 1] + [SMOKE_STEPS + steps % 1000] + flags[index + 2:]


def resumable_checkpoint(folder):
    """The model file of the newest step whose model, EMA and optimizer files all exist, or None.

    image_train.py saves a step's model, then its ema_<rate>_<step>.pt files, then opt: a run killed in
    between leaves a step without its optimizer state, which --resume_checkpoint would silently start
    afresh. A step needs the EMA files of every rate found in the folder."""
    rates = {re.fullmatch(r'ema_(.+)_\d+\.pt', os.path.basename(path))[1] for path in glob.glob(os.path.join(folder, 'ema_*_*.pt'))}
    for model in sorted(glob.glob(os.path.join(folder, 'model*.pt')), key=number_in_name, reverse=True):
        step = number_in_name(model)
        needed = [f'opt{step:06d}.pt'] + [f'ema_{rate}_{step:06d}.pt' for rate in rates]
        if all(os.path.exists(os.path.join(folder, name)) for name in needed):
            return model
    return None


def model_flags(row, smoke):
    """image_sample.py's and image_train.py's model flags of the row (smoke runs: a tiny model, 100 / 101 steps)."""
    if not smoke:
        return list(row.flags)
    class_flags = ['--class_cond', True, '--num_classes', 10] if '--class_cond' in row.recipe.flags else []
    return SMOKE_MODEL + class_flags + smoke_variant_flags(list(row.variant_flags))


def launcher(gpus):
    return [sys.executable] if gpus == 1 else [os.path.join(os.path.dirname(sys.executable), 'mpiexec'), '-n', gpus, sys.executable]


def scoring_protocol(row, folder, smoke, evaluations=None, images=None, dry_run=False):
    """How tools.paper.score scores this row's EMA snapshots: image_sample.py at the full number of steps
    (NFE = T), one FID evaluation (improved-diffusion's paper reports one: each is 50,000 samples at 4,000
    steps); smoke runs: the stand-in detector against statistics of their own synthetic images."""
    flags = model_flags(row, smoke)
    ref = row.recipe.fid_ref
    if smoke and not dry_run:
        ref = reference_statistics(os.path.join(folder, 'synthetic-32x32'), os.path.join(folder, 'fid-ref-standin.npz'), [sys.executable])
    elif not ref.startswith('https://'): # ImageNet64: statistics of the user's own training images
        ref = reference_statistics(os.path.join(ROOT, row.recipe.data), os.path.join(ROOT, ref), [sys.executable], dry_run)
    steps = int(flag_value(flags, '--diffusion_steps'))
    return dict(model_flags=flags, nfe=steps, sampler=f"improved-diffusion's sampler, all {steps} steps", batch=8 if smoke else 256,
                images=images or (SMOKE_IMAGES if smoke else row.recipe.fid_images), evaluations=evaluations or 1, ref=ref,
                detector='standin' if smoke else 'inception', train_batch=4 if smoke else int(flag_value(row.recipe.train_flags, '--batch_size')),
                dry_run=dry_run)


def main():
    parser, args, row = parse_row(__doc__, 'iddpm', gpus_help='MPI processes (one per GPU): mpiexec -n GPUS',
                                  train_flags_help='extra image_train.py flags, e.g. "--microbatch 32"')
    folder = run_dir(args, row)
    run_with = launcher(args.gpus)
    if args.smoke:
        data = synthetic_images(os.path.join(folder, 'synthetic-32x32'), count=16, resolution=32)
        train_flags, iterations, save_interval = SMOKE_TRAIN, 2, 2
    else:
        data = dataset_path(args, row)
        batch = int(flag_value(row.recipe.train_flags, '--batch_size'))
        if batch % args.gpus:
            parser.error(f'the paper\'s batch of {batch} does not split evenly over {args.gpus} processes')
        # The table's batch is global; image_train.py's --batch_size is per MPI process.
        train_flags = ['--lr', flag_value(row.recipe.train_flags, '--lr'), '--batch_size', batch // args.gpus]
        iterations, save_interval = row.recipe.iterations, 50000
    train_flags = train_flags + ['--save_interval', save_interval] + shlex.split(args.train_flags)

    # Train, or continue training, until the checkpoint of the last iteration exists.
    final = os.path.join(folder, f'opt{iterations:06d}.pt')
    latest = resumable_checkpoint(folder)
    if os.path.exists(final):
        print(f'training: done ({os.path.relpath(final, ROOT)})')
    else:
        resume = ['--resume_checkpoint', latest] if latest else []
        command = run_with + ['scripts/image_train.py', '--data_dir', data, *model_flags(row, args.smoke), *train_flags, *resume]
        run_step(command, 'improved-diffusion', dry_run=args.dry_run, env=dict(OPENAI_LOGDIR=folder), stop_when=lambda: os.path.exists(final))

    # Score every EMA snapshot (tools.paper.score), then show samples of the one the row reports.
    protocol = scoring_protocol(row, folder, args.smoke, args.fid_evaluations, args.fid_images, args.dry_run)
    if args.dry_run:
        return score_snapshot(os.path.join(folder, f'ema_0.9999_{iterations:06d}.pt'), folder, row, protocol, run_with)
    records = score_run(folder, row, protocol, run_with, args.snapshots, args.keep_images)
    reported = best(records)
    images, labels = preview(folder, reported, protocol)
    per_class = min(8, min(np.sum(labels == label) for label in range(10))) if '--class_cond' in row.recipe.flags else 0
    if per_class >= 4: # Appendix D: a row a class (a smoke run's few samples may not have enough of each)
        images = np.stack([image for label in range(10) for image in images[labels == label][:per_class]])
        what, row_labels = 'a row a class', CIFAR10_CLASSES
    else:
        images, per_class, what, row_labels = images[:64], 8, 'the first samples', None
    show_samples(images, os.path.join(folder, 'samples.png'), f'{row.name}: {what} of {reported["snapshot"]} (the best FID of the run), '
                 f'{protocol["sampler"]}', args.smoke, count=len(images), columns=min(per_class, len(images)), row_labels=row_labels)


def preview(folder, record, protocol):
    """The images and labels that score_snapshot kept of the record's first evaluation."""
    name = f'{record["snapshot"].rsplit(".", 1)[0]}.nfe{record["nfe"]}.{record["images"]}'
    kept = np.load(os.path.join(folder, 'scores', name + '.preview.npz'))
    return kept['images'], kept['labels']


if __name__ == '__main__':
    main()
