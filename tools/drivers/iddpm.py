"""One paper row on improved-diffusion: train, sample, FID, with its own scripts and the paper's flags.

    python -m tools.drivers.iddpm cifar10-uncond --variant=with-lora --gpus=8
    python -m tools.drivers.iddpm imagenet64 --variant=only-lora --smoke

The row's flags come from the table of paper rows (tools/paper/rows.py). Its image folder is checked
first (tools/data/dataset_check.py: images at --image_size, 3 channels, and for --class_cond rows
--num_classes class names); a bad one is refused in one line. Each step prints the
command it runs (in vendor/improved-diffusion, or vendor/edm for FID), so it can be rerun by hand.
improved-diffusion trains until stopped: this script stops it once the checkpoint of the paper's
last iteration is written. Re-running the row resumes from the newest step whose checkpoint files
are all there (resumable_checkpoint); finished samples and scores are kept.

Scoring (tools/scoring/score.py): every EMA snapshot, 50,000 samples at the full 4000 / 4001 steps
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

import numpy as np

from tools import ROOT
from tools.data.dataset_check import check_image_folder, shown
from tools.drivers.steps import dataset_path, parse_row, run_dir
from tools.figures.images import show_samples
from tools.paper.rows import class_names, flag_value, override
from tools.scoring.records import best, number_in_name, record_name
from tools.scoring.score import score_run, score_snapshot
from tools.scoring.upstreams import IDDPM
from tools.vendoring.run import run_step, working_in

SMOKE_TRAIN = ['--batch_size', 4, '--log_interval', 1]


def row_classes(model_flags):
    """The classes of a class-conditional row (--class_cond True: its --num_classes); 0: unconditional."""
    return int(flag_value(model_flags, '--num_classes')) if flag_value(model_flags, '--class_cond') == 'True' else 0


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


def main(argv=None, launcher=None):
    """launcher: the command prefix every step runs under (default: improved-diffusion's for --gpus)."""
    parser, args, row = parse_row(__doc__, 'iddpm', gpus_help='MPI processes (one per GPU): mpiexec -n GPUS',
                                  train_flags_help='extra image_train.py flags, e.g. "--microbatch 32"', argv=argv)
    batch = int(flag_value(row.recipe.train_flags, '--batch_size'))
    if not args.smoke and batch % args.gpus:
        parser.error(f'the paper\'s batch of {batch} does not split evenly over {args.gpus} processes')
    # The dataset is checked before the run folder exists: a refusal leaves nothing behind.
    data = None if args.smoke else dataset_path(args, row, lambda path: check_image_folder(path, int(flag_value(row.flags, '--image_size')),
                                                                                        row_classes(row.flags)))
    folder = run_dir(args, row)
    with working_in(folder, shown(folder), args.dry_run): # Ctrl-C stops every step; one run a folder
        return run_row(args, row, folder, data, launcher or IDDPM.launcher(args.gpus))


def run_row(args, row, folder, data, run_with):
    if args.smoke:
        data = IDDPM.smoke_data(folder, args.dry_run)
        train_flags, iterations = SMOKE_TRAIN + ['--save_interval', 2], 2
    else:
        batch = int(flag_value(row.recipe.train_flags, '--batch_size'))
        # The recipe's flags (a snapshot every 50,000 steps unless it says); its batch is global, image_train.py's
        # --batch_size is per MPI process.
        train_flags = list(override(override(('--save_interval', 50000), row.recipe.train_flags), ('--batch_size', batch // args.gpus)))
        iterations = row.recipe.iterations
    train_flags += shlex.split(args.train_flags)
    if args.seed is not None:
        train_flags = list(override(train_flags, ('--seed', args.seed)))

    # Train, or continue training, until the checkpoint of the last iteration exists.
    final = os.path.join(folder, f'opt{iterations:06d}.pt')
    latest = resumable_checkpoint(folder)
    if os.path.exists(final):
        print(f'training: done ({os.path.relpath(final, ROOT)})')
    else:
        resume = ['--resume_checkpoint', latest] if latest else []
        command = run_with + ['scripts/image_train.py', '--data_dir', data, *IDDPM.model_flags(row, args.smoke), *train_flags, *resume]
        run_step(command, IDDPM.tree, dry_run=args.dry_run, env=dict(OPENAI_LOGDIR=folder), stop_when=lambda: os.path.exists(final))

    # Score every EMA snapshot (tools.scoring.score), then show samples of the one the row reports.
    protocol = IDDPM.protocol(row, folder, args.smoke, args.fid_evaluations, args.fid_images, args.dry_run)
    if args.dry_run:
        ema_rate = flag_value(train_flags, '--ema_rate', '0.9999')
        return score_snapshot(os.path.join(folder, IDDPM.snapshot_name(iterations, ema_rate)), folder, row, protocol, run_with)
    records = score_run(folder, row, protocol, run_with, args.snapshots, args.keep_images)
    reported = best(records)
    images, labels = preview(folder, reported, protocol)
    per_class = min(8, min(np.sum(labels == label) for label in range(10))) if '--class_cond' in row.recipe.flags else 0
    if per_class >= 4: # Appendix D: a row a class (a smoke run's few samples may not have enough of each)
        images = np.stack([image for label in range(10) for image in images[labels == label][:per_class]])
        what, row_labels = 'a row a class', class_names(row)
    else:
        images, per_class, what, row_labels = images[:64], 8, 'the first samples', None
    show_samples(images, os.path.join(folder, 'samples.png'), f'{row.name}: {what} of {reported["snapshot"]} (the best FID of the run), '
                 f'{protocol["sampler"]}', args.smoke, count=len(images), columns=min(per_class, len(images)), row_labels=row_labels)


def preview(folder, record, protocol):
    """The images and labels that score_snapshot kept of the record's first evaluation."""
    name = record_name(record['snapshot'], record['nfe'], record['images'])
    kept = np.load(os.path.join(folder, 'scores', name + '.preview.npz'))
    return kept['images'], kept['labels']


if __name__ == '__main__':
    main()
