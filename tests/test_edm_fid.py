"""FID plumbing of EDM's fid.py with a stand-in feature network (Inception cannot be downloaded here).

fid.py calc end to end (its FID against an independent Frechet distance of the images' features) is
tested where the scoring runs it: tests/test_score.py."""

import os

import numpy as np
import PIL.Image
import pytest

from conftest import EDM, run_in
from tools import ROOT
from tools.scoring.fid_standin import frechet_distance_through_eigenvalues
from tools.data.synthetic import write_folder


def features(folder, weights):
    """The stand-in's features, computed here independently of fid.py and EDM's dataset code."""
    names = sorted(n for n in os.listdir(folder) if n.endswith('.png'))
    images = np.stack([np.asarray(PIL.Image.open(os.path.join(folder, n))).transpose(2, 0, 1) for n in names])
    return np.tanh(images.reshape(len(names), -1).astype(np.float64) / 255 @ weights)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    top = tmp_path_factory.mktemp('fid')
    for name, count, seed, classes in [('real', 40, 0, 10), ('fake', 30, 1, 3)]:
        write_folder(top / name, count=count, seed=seed, classes=classes)
    weights = np.random.default_rng(0).normal(size=(3 * 16 * 16, 2048)) / np.sqrt(3 * 16 * 16)
    np.save(top / 'weights.npy', weights)
    return top, weights


def fid_py(top, *args):
    # The stand-in's Frechet distance (through eigendecompositions, 2 s instead of sqrtm's 20 s at 2048
    # features) is checked against fid.py's own below, on small covariances.
    result = run_in(EDM, [os.path.join(ROOT, 'tools', 'scoring', 'fid_standin.py'), *args], env=dict(STANDIN_WEIGHTS=str(top / 'weights.npy')))
    return result.stdout


def test_reference_statistics_are_the_feature_mean_and_covariance(folders):
    top, weights = folders
    fid_py(top, 'ref', f'--data={top / "real"}', f'--dest={top / "real.npz"}')
    ref = np.load(top / 'real.npz')
    real = features(top / 'real', weights)
    assert ref['mu'].shape == (2048,) and ref['sigma'].shape == (2048, 2048)
    assert np.allclose(ref['mu'], real.mean(0), rtol=0, atol=1e-9)
    assert np.allclose(ref['sigma'], np.cov(real, rowvar=False), rtol=0, atol=1e-9)


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances: FD = ||mu_a - mu_b||^2 + sum_i (sqrt(s_a,i) - sqrt(s_b,i))^2, checked on EDM's formula.
    import sys
    sys.path.insert(0, EDM)
    try:
        import fid
    finally:
        sys.path.remove(EDM)
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s_a, s_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(s_a) - np.sqrt(s_b)) ** 2)
    assert fid.calculate_fid_from_inception_stats(mu_a, np.diag(s_a), mu_b, np.diag(s_b)) == pytest.approx(expected, rel=1e-9)
    # Equal statistics are at distance 0 (a full covariance: the matrix square root is not elementwise).
    features = np.random.default_rng(0).normal(size=(50, 8))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert abs(fid.calculate_fid_from_inception_stats(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    # The stand-in's faster route (smoke runs and the scoring tests) gives fid.py's distance, also for
    # singular covariances (fewer samples than features, as in smoke runs).
    other = np.random.default_rng(1).normal(size=(6, 8)) + 0.5
    for a, b in [(features, features[::-1] * 2 + 1), (features, other), (other, features)]:
        args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert frechet_distance_through_eigenvalues(*args) == pytest.approx(fid.calculate_fid_from_inception_stats(*args), rel=1e-6)
