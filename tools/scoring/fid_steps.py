"""The fid.py steps of every upstream's runs: reference statistics (fid.py ref) and the FID of a folder
of images (fid.py calc), both run in vendor/edm; smoke runs use the stand-in detector (fid_standin.py),
which runs the same fid.py with another feature network. (Not named fid.py: fid_standin.py runs from
this folder and imports EDM's fid.)"""

import os
import sys

from tools import ROOT
from tools.vendoring.run import run_step

STANDIN = os.path.join(ROOT, 'tools', 'scoring', 'fid_standin.py')


def fid_script(detector):
    return [STANDIN] if detector == 'standin' else ['fid.py']


def compute_fid(image_dir, protocol, dry_run=False):
    """fid.py calc in one process, whatever the processes that generated: the statistics of 50,000 images
    take a minute or two on one GPU, and torchrun would take fid.py's --num for its own --numa-binding
    (argparse abbreviations: "ambiguous option"), as mpiexec would start copies that do not share the work."""
    output = run_step([sys.executable] + fid_script(protocol['detector'])
                      + ['calc', f'--images={image_dir}', f'--ref={protocol["ref"]}', f'--num={protocol["images"]}'], 'edm', dry_run=dry_run)
    return None if dry_run else float(output.strip().splitlines()[-1])


def reference_statistics(data, dest, detector, dry_run=False):
    """fid.py ref of a dataset (smoke runs: with the stand-in; ImageNet64: Inception), written once and atomically."""
    if not os.path.exists(dest):
        run_step([sys.executable] + fid_script(detector) + ['ref', f'--data={data}', f'--dest={dest}.partial.npz'], 'edm', dry_run=dry_run)
        if not dry_run:
            os.replace(f'{dest}.partial.npz', dest)
    return dest
