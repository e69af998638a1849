"""The steps every paper-row driver takes (tools.paper.edm, tools.paper.iddpm): parse the row, run
each upstream command in its vendor tree, find the newest checkpoint, show samples (scoring:
tools.paper.score)."""

import argparse
import glob
import os
import re
import shlex
import socket
import subprocess
import sys

from tools import ROOT
from tools.data.synthetic import write_folder
from tools.images import save_grid
from tools.paper.rows import find, rows
from tools.vendoring.upstream import read_upstream


def parse_row(doc, upstream, gpus_help, train_flags_help):
    """The command line both drivers share: a dataset, its variant, processes, smoke / dry runs.
    Returns (parser, args, row of the table of paper rows)."""
    runnable = rows(upstream=upstream, runnable=True)
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('dataset', choices=sorted({row.dataset for row in runnable}), help='dataset and conditioning of the paper row')
    parser.add_argument('--variant', choices=sorted({row.variant for row in runnable}), default='with-lora', help='paper row type')
    parser.add_argument('--gpus', type=int, default=1, help=gpus_help)
    parser.add_argument('--smoke', action='store_true', help='tiny CPU run on synthetic data')
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs'), help='where run folders go')
    parser.add_argument('--train-flags', default='', help=train_flags_help)
    parser.add_argument('--dry-run', action='store_true', help='print the commands (e.g. to launch them on several nodes) without running them')
    parser.add_argument('--snapshots', default='all', help="snapshots to score: 'all', 'last' or a comma list of their numbers (kimg / steps)")
    parser.add_argument('--fid-evaluations', type=int, help='FID evaluations a snapshot, each with other seeds; the minimum is reported (EDM: 3, improved-diffusion: 1)')
    parser.add_argument('--fid-images', type=int, help="images an FID evaluation (default: the row's, 50,000)")
    parser.add_argument('--keep-images', action='store_true', help='keep the generated images once scored')
    args = parser.parse_args()
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
    """runs/<upstream>-<dataset>-<variant>[-smoke], created."""
    path = os.path.join(args.runs, row.name + ('-smoke' if args.smoke else ''))
    os.makedirs(path, exist_ok=True)
    return path


def dataset_path(args, row):
    """The row's dataset; a missing one is an error that names the make target writing it."""
    path = os.path.join(ROOT, row.recipe.data)
    if not os.path.exists(path) and not args.dry_run:
        sys.exit(f'{row.upstream}: {row.recipe.data} is missing; run `make {row.recipe.make_data}` first')
    return path


def synthetic_images(folder, count, resolution):
    """A synthetic image folder (tools.data.synthetic) for smoke runs, written once."""
    if not os.path.isdir(folder):
        write_folder(folder, count=count, resolution=resolution)
        print(f'wrote {count} images of {resolution}x{resolution} to {folder}')
    return folder


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def run_step(command, tree, dry_run=False, env=None, stop_when=None):
    """Run `command` in vendor/<tree> (on its PYTHONPATH), echoing and returning its output.

    stop_when: a function called after each output line; when it returns True, the step has done
    its work (improved-diffusion trains until it is killed) and its process group is stopped.
    """
    cwd = os.path.join(ROOT, 'vendor', tree)
    print(f'\n[vendor/{tree}]$ {shlex.join(str(c) for c in command)}', flush=True)
    if dry_run:
        return ''
    # EDM's single-process scripts open a process group on MASTER_PORT (29500 unless set): each step gets
    # a free port, so that two runs on one machine do not join each other's group (torchrun sets its own).
    env = dict(os.environ, PYTHONPATH=cwd, **(env or {}))
    env.setdefault('MASTER_PORT', free_port())
    process = subprocess.Popen([str(c) for c in command], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    for line in process.stdout:
        print(line, end='', flush=True)
        output.append(line)
        if stop_when is not None and stop_when():
            os.killpg(process.pid, 15)
            process.wait()
            return ''.join(output)
    if process.wait() != 0:
        sys.exit(f'step failed ({process.returncode}): {shlex.join(str(c) for c in command)}')
    return ''.join(output)


def number_in_name(path):
    """The last number in a file name: network-snapshot-000200.pkl -> 200, model500000.pt -> 500000."""
    return int(re.findall(r'(\d+)\D*$', os.path.basename(path))[0])


def newest(pattern):
    """The file matching pattern with the largest number in its name, or None."""
    paths = glob.glob(pattern)
    return max(paths, key=number_in_name) if paths else None


SMOKE_CAPTION = ('Smoke run: a few training steps on synthetic images, so these samples are noise by design '
                 '(it checks that every step runs, not what the model learns).')


def show_samples(images, out_path, caption, smoke=False, count=16, columns=None, row_labels=None):
    """A PNG grid of the first `count` samples ([N, H, W, 3] uint8), `columns` a row, 128 pixels each,
    a white line between them, `caption` above (what was sampled; for smoke runs, why it is noise) and
    row_labels, if given, on the left."""
    images = images[:count]
    caption = f'{caption}\n{SMOKE_CAPTION}' if smoke else caption
    save_grid(images, out_path, columns=columns, scale=max(1, 128 // images.shape[1]), gap=1, caption=caption, row_labels=row_labels)
    print(f'\nsample grid: {os.path.relpath(out_path, ROOT)}')
