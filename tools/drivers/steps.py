"""What both paper-row drivers (tools.drivers.edm, tools.drivers.iddpm) share: the command line of a
row, its run folder and its dataset. (Running upstream commands: tools.vendoring.run; scoring:
tools.scoring.)"""

import argparse
import os
import re
import sys

from tools import ROOT
from tools.data.dataset_check import DatasetError
from tools.paper.rows import find, rows, run_folder
from tools.vendoring.upstream import read_upstream


def parse_row(doc, upstream, gpus_help, train_flags_help, argv=None):
    """The command line both drivers share: a dataset, its variant, processes, smoke / dry runs.
    Returns (parser, args, row of the table of paper rows)."""
    runnable = rows(upstream=upstream, runnable=True, mini=None)
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('dataset', choices=sorted({row.dataset for row in runnable}), help='dataset and conditioning of the paper row')
    parser.add_argument('--variant', choices=sorted({row.variant for row in runnable}), default='with-lora', help='paper row type')
    parser.add_argument('--gpus', type=int, default=1, help=gpus_help)
    parser.add_argument('--smoke', action='store_true', help='tiny CPU run on synthetic data')
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs'), help='where run folders go')
    parser.add_argument('--seed', type=int, help="the training seed (train.py's / image_train.py's --seed); its run folder ends in -seed<N>")
    parser.add_argument('--train-flags', default='', help=train_flags_help)
    parser.add_argument('--dry-run', action='store_true', help='print the commands (e.g. to launch them on several nodes) without running them')
    parser.add_argument('--snapshots', default='all', help="snapshots to score: 'all', 'last' or a comma list of their numbers (kimg / steps)")
    parser.add_argument('--fid-evaluations', type=int, help='FID evaluations a snapshot, each with other seeds; the minimum is reported (EDM: 3, improved-diffusion: 1)')
    parser.add_argument('--fid-images', type=int, help="images an FID evaluation (default: the row's, 50,000)")
    parser.add_argument('--keep-images', action='store_true', help='keep the generated images once scored')
    args = parser.parse_args(argv)
    if args.seed is not None and args.seed < 0:
        parser.error('--seed must be 0 or more')
    if args.gpus < 1:
        parser.error('--gpus must be at least 1')
    if (args.fid_evaluations is not None and args.fid_evaluations < 1) or (args.fid_images is not None and args.fid_images < 2):
        parser.error('--fid-evaluations must be at least 1 and --fid-images at least 2')
    if args.snapshots not in ('all', 'last') and not re.fullmatch(r'\d+(,\d+)*', args.snapshots):
        parser.error(f"--snapshots: 'all', 'last' or numbers separated by commas, not {args.snapshots!r}")
    try:
        row = find(upstream, args.dataset, args.variant)
    except KeyError:
        variants = [r.variant for r in runnable if r.dataset == args.dataset]
        parser.error(f'{args.dataset} has no variant {args.variant} (choose from {", ".join(variants)})')
    tree = read_upstream(upstream)['dir']
    if not os.path.isdir(os.path.join(ROOT, 'vendor', tree)):
        sys.exit(f'{upstream}: vendor/{tree} is missing; run `make vendor` first')
    return parser, args, row


def run_dir(args, row):
    """The row's run folder (tools.paper.rows.run_folder), absolute (the steps run in vendor/), created
    unless this is a dry run."""
    path = os.path.abspath(run_folder(args.runs, row, args.smoke, seed=args.seed))
    if not args.dry_run:
        os.makedirs(path, exist_ok=True)
    return path


def dataset_path(args, row, check):
    """The row's dataset, checked before anything trains on it: `check(path)` (tools.data.dataset_check)
    opens it, lists its images and reads one. A missing or bad dataset is an error of one line that names
    the file, the problem and the make target writing it (a dry run may name a dataset not there yet)."""
    path = os.path.join(ROOT, row.recipe.data)
    if not os.path.exists(path):
        if not args.dry_run:
            sys.exit(f'{row.upstream}: {row.recipe.data} is missing; run `make {row.recipe.make_data}` first')
        return path
    try:
        check(path)
    except DatasetError as err:
        sys.exit(f'{row.upstream}: {err}; remove it and run `make {row.recipe.make_data}`')
    return path
