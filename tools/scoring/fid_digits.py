"""Run EDM's fid.py (ref or calc) with the digit detector in place of Inception-v3, or write the
detector's features of a set of images (for KID).

    python tools/scoring/fid_digits.py ref|calc <fid.py options>      # in vendor/edm, on its PYTHONPATH
    python tools/scoring/fid_digits.py features --images=PATH|ZIP --dest=NPZ [--num=N] [--seed=S] [--batch=B]

The mini tables' FID: everything but the feature network is the upstream's own code (the image
loading, the statistics, the Frechet distance, the .npz files), as in fid_standin.py. The detector
(tools/scoring/digit_detector.py) is the one at DIGIT_DETECTOR=PATH, else at digit_detector.DETECTOR_PATH,
built there first if missing.

fid.py sums features into a mean and covariance of its fixed width, 2048: the detector's 64 features
go in padded with zeros, and the statistics are cut back to 64 before the distance and the .npz (the
padding costs a 2048 x 2048 product a batch, about a second per thousand images on 2 CPU cores).
A set of fewer than digit_detector.MIN_IMAGES images (10 x the features) is refused in one line:
its covariance would be singular. Images load in the main process (fid_standin.py says why).

`features` reads images as fid.py does (EDM's ImageFolderDataset: a folder or zip, --num of them
picked by --seed) and writes their features [N, 64] as `features` in an .npz (written whole, then
renamed); digit_detector.kid(read_features(a), read_features(b)) is their KID.
"""

import os
import sys

import numpy as np
import torch

# Run from vendor/edm, with only the EDM tree on PYTHONPATH: the project's root goes on the path, for the detector.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tools.scoring.digit_detector import DETECTOR_PATH, FEATURES, MIN_IMAGES, load_detector
from tools.scoring.fid_standin import in_place_of_inception

FID_PY_FEATURES = 2048 # fid.py's feature_dim, fixed in its calculate_inception_stats


class PaddedDetector(torch.nn.Module):
    """The detector's features padded with zeros to fid.py's 2048."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images, return_features):
        assert return_features
        features = self.detector(images, return_features=True)
        return torch.nn.functional.pad(features, (0, FID_PY_FEATURES - FEATURES))


def refuse_too_few(folder_dataset, image_path, num_expected):
    """One line, not a singular covariance, for fewer than MIN_IMAGES images (or fewer than --num, fid.py's own check)."""
    found = len(folder_dataset(path=image_path))
    if num_expected is not None and found < num_expected:
        sys.exit(f'fid_digits: found {found} images in {image_path}, but expected at least {num_expected}')
    count = found if num_expected is None else num_expected
    if count < MIN_IMAGES:
        sys.exit(f'fid_digits: {count} images from {image_path}; the digit detector needs at least {MIN_IMAGES} '
                 f'(10 x its {FEATURES} features, for a full-rank covariance)')


def write_features(detector, folder_dataset, image_path, dest, num_expected, seed, batch):
    """The detector's features of the images fid.py would read (its loader, selection and batches)."""
    refuse_too_few(folder_dataset, image_path, num_expected)
    images = folder_dataset(path=image_path, max_size=num_expected, random_seed=seed)
    loader = torch.utils.data.DataLoader(images, batch_size=batch, num_workers=0)
    features = []
    with torch.no_grad():
        for batch_images, _labels in loader:
            features.append(detector(batch_images, return_features=True).to(torch.float64).numpy())
    if os.path.dirname(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
    partial = dest + '.partial.npz' # np.savez adds .npz to a name without it
    np.savez(partial, features=np.concatenate(features))
    os.replace(partial, dest)
    print(f'{len(images)} images: features written to {dest}')


def main():
    # fid.py imports from the EDM tree, which is on PYTHONPATH.
    import click
    import dnnlib
    import fid
    from training.dataset import ImageFolderDataset

    detector = load_detector(os.environ.get('DIGIT_DETECTOR') or DETECTOR_PATH)
    if sys.argv[1:2] == ['features']:
        @click.command()
        @click.option('--images', 'image_path', required=True, help='Path to the images (folder or zip)')
        @click.option('--dest', required=True, help='Destination .npz file')
        @click.option('--num', 'num_expected', type=click.IntRange(min=2), default=None, help='Number of images to use (default: all)')
        @click.option('--seed', type=int, default=0, help='Random seed for selecting the images')
        @click.option('--batch', type=click.IntRange(min=1), default=64, help='Maximum batch size')
        def features(image_path, dest, num_expected, seed, batch):
            write_features(detector, ImageFolderDataset, image_path, dest, num_expected, seed, batch)
        features.main(sys.argv[2:], standalone_mode=False)
        return

    in_place_of_inception(dnnlib, PaddedDetector(detector))

    upstream_stats = fid.calculate_inception_stats
    def digit_stats(image_path, num_expected=None, **kwargs):
        refuse_too_few(ImageFolderDataset, image_path, num_expected)
        # Loaded in this process: fid_standin.py says why.
        mu, sigma = upstream_stats(image_path=image_path, num_expected=num_expected, **kwargs, num_workers=0, prefetch_factor=None)
        assert not mu[FEATURES:].any() and not sigma[FEATURES:].any() and not sigma[:, FEATURES:].any()
        return mu[:FEATURES], sigma[:FEATURES, :FEATURES]
    fid.calculate_inception_stats = digit_stats
    fid.main(sys.argv[1:], standalone_mode=False)


# DataLoader workers are spawned: they import this file again and must not run fid.py.
if __name__ == '__main__':
    main()
