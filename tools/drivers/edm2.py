"""One EDM2 row (not a paper row: UC-LoRA on EDM2's attention): train, score every snapshot, show samples,
with EDM2's own CLIs and the row's flags.

    python -m tools.drivers.edm2 cifar10-uncond --variant=with-lora --gpus=8
    python -m tools.drivers.edm2 img64 --variant=baseline --smoke

The row's flags come from the table of rows (tools/paper/rows.py: EDM2_ROWS). Its dataset is checked first, as
EDM's driver checks it (EDM2 reads EDM's zip format). Each step prints the command it runs (in vendor/edm2), so
it can be rerun by hand. Re-running the same row continues where it stopped: train_edm2.py resumes from the newest
training-state-*.pt of the run folder by itself (EDM2's README: "run the same command again"), and scoring skips
what it has recorded.

Scoring (tools/scoring/score.py, EDM2 in tools/scoring/upstreams.py) is EDM2's way of reporting a network: at each
training snapshot, the post-hoc EMA of relative length 0.075 (reconstruct_phema.py), sampled by generate_images.py,
FID with EDM's fid.py as every row of this project, the minimum of 3 evaluations.

--smoke runs the same steps on the CPU at tiny size: a synthetic dataset in EDM's zip format (written by EDM2's
dataset_tool.py), a tiny network with attention at 16x16 and 8x8, 2 kimg of training, 32 images an FID evaluation
with a stand-in detector (fid.py downloads Inception-v3 at run time).
"""

import os
import re
import shlex
import sys

from tools import ROOT
from tools.data.dataset_check import check_edm_zip, shown
from tools.drivers.edm import sample_grid
from tools.drivers.steps import dataset_path, parse_row, run_dir
from tools.paper.rows import IMAGENET_CLASSES, edm_classes, flag_value, override
from tools.scoring.records import best, newest, number_in_name
from tools.scoring.score import score_run, score_snapshot
from tools.scoring.upstreams import EDM2
from tools.vendoring.run import run_step, working_in

# A tiny network that still has attention to condition: 16 and 32 channels at 16x16 and 8x8, 16 channels a head.
SMOKE_FLAGS = ('--channels=16', '--cres=1,2', '--blocks=1', '--channels-per-head=16', '--batch=16', '--duration=2Ki',
               '--status=1Ki', '--snapshot=1Ki', '--checkpoint=1Ki', '--lr-rampup=0', '--seed=0')


def nimg(text):
    """Training images from EDM2's spelling of them: 1024, 24Ki, 200Mi, 1Gi (train_edm2.py's parse_nimg)."""
    match = re.fullmatch(r'(\d+)(Ki|Mi|Gi)?', text or '')
    if not match:
        sys.exit(f'edm2: --duration={text}: a count of training images, as train_edm2.py reads it (1024, 24Ki, 200Mi, 1Gi)')
    return int(match[1]) << {None: 0, 'Ki': 10, 'Mi': 20, 'Gi': 30}[match[2]]


def grid_classes(row):
    """The rows of samples.png: a class each for CIFAR-10 and the digits; ImageNet's 1,000 classes get a random class a seed."""
    classes = edm_classes(row)
    return 0 if classes == IMAGENET_CLASSES else classes


def main(argv=None):
    parser, args, row = parse_row(__doc__, 'edm2', gpus_help='processes (GPUs) per node for torchrun',
                                  train_flags_help='extra train_edm2.py flags, e.g. "--batch-gpu=64"', argv=argv)
    # The dataset is checked before the run folder exists: a refusal leaves nothing behind.
    data = None if args.smoke else dataset_path(args, row, lambda path: check_edm_zip(path, row.recipe.resolution, edm_classes(row)))
    folder = run_dir(args, row)
    with working_in(folder, shown(folder), args.dry_run): # Ctrl-C stops every step; one run a folder
        return run_row(args, row, folder, data, EDM2.launcher(args.gpus))


def run_row(args, row, folder, data, launcher):
    run = lambda command: run_step(launcher + command, EDM2.tree, dry_run=args.dry_run)
    if args.smoke:
        data = EDM2.smoke_data(folder, args.dry_run)
        train_flags = list(override(row.flags, SMOKE_FLAGS))
    else:
        train_flags = list(row.flags)
    train_flags += shlex.split(args.train_flags)
    if args.seed is not None:
        train_flags = list(override(train_flags, (f'--seed={args.seed}',)))

    # Train, or continue from the newest training state (train_edm2.py finds it itself).
    total_kimg = nimg(flag_value(train_flags, '--duration')) // 1000 # as EDM2 names its files
    state = newest(os.path.join(folder, 'training-state-*.pt'))
    if state and number_in_name(state) >= total_kimg:
        print(f'training: done ({os.path.relpath(state, ROOT)} reached {total_kimg} kimg)')
    else:
        run(['train_edm2.py', f'--outdir={folder}', f'--data={data}'] + train_flags)

    # Score the post-hoc EMA network of every snapshot, then draw samples of the snapshot the row reports.
    protocol = EDM2.protocol(row, folder, args.smoke, args.fid_evaluations, args.fid_images, args.dry_run)
    if args.dry_run:
        EDM2.prepare_snapshots(folder, dry_run=True, kimgs=[total_kimg])
        return score_snapshot(os.path.join(folder, EDM2.snapshot_name(total_kimg)), folder, row, protocol, launcher)
    records = score_run(folder, row, protocol, launcher, args.snapshots, args.keep_images)
    sample_grid(folder, row, best(records)['snapshot'], protocol, launcher, args.smoke, EDM2, grid_classes(row))


if __name__ == '__main__':
    main()
