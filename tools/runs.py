"""Pieces shared by the paper-row drivers (edm_paper.py, iddpm_paper.py): run a step, find files, show samples."""

import argparse
import glob
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_step(command, tree, dry_run=False, env=None, stop_when=None):
    """Run `command` in vendor/<tree> (on its PYTHONPATH), echoing and returning its output.

    stop_when: a function called after each output line; when it returns True, the step has done
    its work (improved-diffusion trains until it is killed) and its process group is stopped.
    """
    cwd = os.path.join(ROOT, 'vendor', tree)
    print(f'\n[vendor/{tree}]$ {shlex.join(str(c) for c in command)}', flush=True)
    if dry_run:
        return ''
    process = subprocess.Popen([str(c) for c in command], cwd=cwd, env=dict(os.environ, PYTHONPATH=cwd, **(env or {})),
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


def save_grid(images, out_path, count=16):
    """A PNG grid of the first `count` images ([N, H, W, 3] uint8), enlarged 4x for viewing."""
    images = images[:count]
    columns = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    h, w, _ = images[0].shape
    grid = np.zeros([rows * h, columns * w, 3], dtype=np.uint8)
    for i, image in enumerate(images):
        grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = image
    PIL.Image.fromarray(grid).resize([columns * w * 4, rows * h * 4], PIL.Image.NEAREST).save(out_path)
    print(f'\nsample grid: {os.path.relpath(out_path, ROOT)}')


def paper_row_parser(doc, rows, variants, gpus_help, train_flags_help):
    """The command line both drivers share: a row, its variant, processes, smoke / dry runs."""
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('row', choices=sorted(rows), help='dataset and conditioning of the paper row')
    parser.add_argument('--variant', choices=variants, default='with-lora', help='paper row type')
    parser.add_argument('--gpus', type=int, default=1, help=gpus_help)
    parser.add_argument('--smoke', action='store_true', help='tiny CPU run on synthetic data')
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs'), help='where run folders go')
    parser.add_argument('--train-flags', default='', help=train_flags_help)
    parser.add_argument('--dry-run', action='store_true', help='print the commands (e.g. to launch them on several nodes) without running them')
    return parser


def edm_fid(fid_file, images, ref, note, launcher):
    """FID of an image folder by EDM's fid.py (50,000 images) against reference statistics `ref`.

    Computed once: the score and `note` (what was scored) stay in fid_file.
    """
    if not os.path.exists(fid_file):
        output = run_step([*launcher, 'fid.py', 'calc', f'--images={images}', f'--ref={ref}', '--num=50000'], 'edm')
        with open(fid_file, 'w') as f:
            f.write(f'{output.strip().splitlines()[-1]}  # {note}\n')
    with open(fid_file) as f:
        print(f'FID: {f.read().strip()}')
