"""Run EDM's fid.py (ref or calc) with a stand-in feature network in place of Inception-v3.

    python tools/scoring/fid_standin.py ref|calc <fid.py options>      # in vendor/edm, on its PYTHONPATH

fid.py downloads Inception-v3 at run time, which an offline machine cannot. Smoke runs and the tests
score with this stand-in instead; everything else is the upstream's own code: the image loading, the
statistics, the Frechet distance and the .npz files. Its FID numbers only check the plumbing; they
mean nothing about image quality, and every record made with it says so.

The stand-in maps an image of n values to 2048 features, tanh(flatten(image / 255) @ W), with W a
fixed random n x 2048 matrix (standin_weights: seed 0, or STANDIN_WEIGHTS=W.npy).

fid.py takes scipy.linalg.sqrtm of a 2048 x 2048 product, about 18 s on 2 CPU cores, and then uses
only its trace. Unless STANDIN_UPSTREAM_SQRTM=1, the distance is computed through symmetric
eigendecompositions instead (frechet_distance_through_eigenvalues, about 2 s; the tests check it
against fid.py's own function). Images load in the main process.
"""

import io
import os
import pickle
import sys

import numpy as np
import scipy.linalg
import torch


def standin_weights(num_inputs):
    """The stand-in's fixed projection of num_inputs pixel values to 2048 features."""
    if os.environ.get('STANDIN_WEIGHTS'):
        return np.load(os.environ['STANDIN_WEIGHTS'])
    return np.random.default_rng(0).normal(size=(num_inputs, 2048)) / np.sqrt(num_inputs)


class StandInDetector(torch.nn.Module):
    def forward(self, images, return_features):
        assert return_features
        weights = torch.as_tensor(standin_weights(images[0].numel()), dtype=torch.float64, device=images.device)
        return torch.tanh(images.to(torch.float64).flatten(1) / 255 @ weights)


def frechet_distance_through_eigenvalues(mu, sigma, mu_ref, sigma_ref):
    """fid.py's Frechet distance, with tr sqrtm(S S_ref) as the sum of the square roots of the
    eigenvalues of S^1/2 S_ref S^1/2 (the same eigenvalues, for covariances S and S_ref)."""
    # LAPACK's MRRR driver: NumPy's default takes ~10x longer on the low-rank covariances of a few images.
    values, vectors = scipy.linalg.eigh(sigma, driver='evr')
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = scipy.linalg.eigh(root @ sigma_ref @ root, eigvals_only=True, driver='evr')
    return float(np.square(mu - mu_ref).sum() + np.trace(sigma) + np.trace(sigma_ref) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def in_place_of_inception(dnnlib, detector):
    """Make fid.py load `detector` (a torch module) where it downloads Inception-v3: its detector URL
    goes through dnnlib.util.open_url, which then hands back the module's pickle."""
    pickled = pickle.dumps(detector)
    open_url = dnnlib.util.open_url
    def open_url_with_detector(url, *args, **kwargs):
        if 'inception' in url:
            return io.BytesIO(pickled)
        return open_url(url, *args, **kwargs)
    dnnlib.util.open_url = open_url_with_detector


def main():
    # fid.py imports from the EDM tree, which is on PYTHONPATH.
    import dnnlib
    import fid

    in_place_of_inception(dnnlib, StandInDetector())

    # Load the images in this process: each of fid.py's 3 loader processes would import torch again
    # (seconds each) to read a few dozen small images.
    upstream_stats = fid.calculate_inception_stats
    fid.calculate_inception_stats = lambda **kwargs: upstream_stats(**kwargs, num_workers=0, prefetch_factor=None)
    if not os.environ.get('STANDIN_UPSTREAM_SQRTM'):
        fid.calculate_fid_from_inception_stats = frechet_distance_through_eigenvalues
    fid.main(sys.argv[1:], standalone_mode=False)


# DataLoader workers are spawned: they import this file again and must not run fid.py.
if __name__ == '__main__':
    main()
