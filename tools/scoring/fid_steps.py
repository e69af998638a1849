"""The fid.py steps of every upstream's runs: reference statistics (fid.py ref) and the FID of a folder
of images (fid.py calc), both run in vendor/edm, by the protocol's detector: 'inception' (fid.py itself),
'standin' (smoke runs: fid_standin.py, the same fid.py with another feature network) or 'digits' (the
mini tables: fid_digits.py, with the digit detector), and the digit detector's features of a set of
images, for KID (digit_detector.kid). (Not named fid.py: fid_standin.py and fid_digits.py run from this
folder and import EDM's fid.)"""

import os
import sys

from tools import ROOT
from tools.vendoring.run import run_step

STANDIN = os.path.join(ROOT, 'tools', 'scoring', 'fid_standin.py')
DIGITS = os.path.join(ROOT, 'tools', 'scoring', 'fid_digits.py')
# The script that runs fid.py with each detector of records.DETECTORS.
FID_SCRIPTS = {'inception': 'fid.py', 'standin': STANDIN, 'digits': DIGITS}


def fid_script(detector):
    return [FID_SCRIPTS[detector]]


def compute_fid(image_dir, protocol, dry_run=False):
    """fid.py calc in one process, whatever the processes that generated: the statistics of 50,000 images
    take a minute or two on one GPU, and torchrun would take fid.py's --num for its own --numa-binding
    (argparse abbreviations: "ambiguous option"), as mpiexec would start copies that do not share the work."""
    output = run_step([sys.executable] + fid_script(protocol['detector'])
                      + ['calc', f'--images={image_dir}', f'--ref={protocol["ref"]}', f'--num={protocol["images"]}'], 'edm', dry_run=dry_run)
    return None if dry_run else float(output.strip().splitlines()[-1])


def reference_statistics(data, dest, detector, dry_run=False):
    """fid.py ref of a dataset (smoke runs: with the stand-in; mini: the digit detector; ImageNet64: Inception), written once and atomically."""
    if not os.path.exists(dest):
        run_step([sys.executable] + fid_script(detector) + ['ref', f'--data={data}', f'--dest={dest}.partial.npz'], 'edm', dry_run=dry_run)
        if not dry_run:
            os.replace(f'{dest}.partial.npz', dest)
    return dest


def digit_features(images, dest, num=None, dry_run=False):
    """The digit detector's features of a folder or zip of images (fid_digits.py features: fid.py's
    loader; `num` of them, picked as fid.py calc --num picks, or all), written once and atomically to
    dest (.npz); read them with digit_detector.read_features, compare two with digit_detector.kid."""
    if not os.path.exists(dest):
        run_step([sys.executable, DIGITS, 'features', f'--images={images}', f'--dest={dest}'] + ([f'--num={num}'] if num else []),
                 'edm', dry_run=dry_run)
    return dest
