"""The nano diffusion CLI (overlay/dataflowr/nano.py) on real MNIST digits, at tiny budgets."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import NANO

TINY = ['--train-digits', 64, '--batch-size', 32, '--data', 'mnist5k']


def nano(*args, expect_ok=True):
    result = subprocess.run([sys.executable, 'nano.py', *[str(a) for a in args]], cwd=NANO, env=dict(os.environ, PYTHONPATH=NANO),
                            text=True, capture_output=True)
    if expect_ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_rerunning_resumes_exactly(tmp_path):
    nano('--cond', 'timelora', *TINY, '--epochs', 2, '--samples', 0, '--out', tmp_path / 'straight')
    nano('--cond', 'timelora', *TINY, '--epochs', 1, '--samples', 0, '--out', tmp_path / 'resumed')
    result = nano('--cond', 'timelora', *TINY, '--epochs', 2, '--samples', 0, '--out', tmp_path / 'resumed')
    assert 'resuming' in result.stdout and 'after epoch 1' in result.stdout
    straight, resumed = (torch.load(tmp_path / run / 'checkpoint.pt', weights_only=False) for run in ['straight', 'resumed'])
    assert resumed['epoch'] == straight['epoch'] == 2 and resumed['losses'] == straight['losses']
    for name, value in straight['network'].items():
        assert torch.equal(resumed['network'][name], value), name
    changed = nano('--cond', 'uclora', *TINY, '--epochs', 3, '--samples', 0, '--out', tmp_path / 'resumed', expect_ok=False)
    assert changed.returncode == 2 and 'other options' in changed.stderr


def test_a_run_writes_denormalised_pngs_and_metrics(tmp_path):
    nano('--cond', 'uclora', *TINY, '--epochs', 1, '--samples', 8, '--out', tmp_path)
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert metrics['optimizer_steps'] == 2 and metrics['images_seen'] == 64 and metrics['samples'] == 8
    assert len(metrics['class_shares']) == 10 and abs(sum(metrics['class_shares']) - 1) < 0.01
    assert metrics['classifier_test_accuracy'] > 0.9, 'the proxy FID classifier recognises real held-out digits'
    assert 'not Inception FID' in metrics['proxy_fid_note']
    grid = np.asarray(PIL.Image.open(tmp_path / 'samples.png'))
    assert grid.dtype == np.uint8 and grid.shape == (64, 16 * 64)
    assert PIL.Image.open(tmp_path / 'loss.png').size[0] > 100


def test_denormalisation_maps_the_model_range_to_pixels():
    sys.path.insert(0, NANO)
    import nano as cli
    pixels = cli.to_pixels(torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.7]))
    assert pixels.tolist() == [0, 64, 128, 255, 255]
    digits = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    x = cli.to_model_range(digits)
    assert x.shape == (2, 1, 32, 32) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize('args,message', [
    (['--cond', 'film'], "argument --cond: invalid choice: 'film'"),
    (['--data', '/no/such/mnist'], '--data /no/such/mnist: no such folder'),
    (['--out', '/proc/nano-run'], '--out /proc/nano-run: cannot write there'),
    (['--epochs', 0], '--epochs must be at least 1'),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    full = ['--out', tmp_path / 'run'] + args if '--out' not in args else args
    result = nano(*full, expect_ok=False)
    assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr


def test_rescaled_view_stretches_each_sample_and_ignores_its_mean():
    sys.path.insert(0, NANO)
    import nano as cli
    import nano_metrics
    torch.manual_seed(0)
    x = torch.randn(3, 1, 32, 32)
    pixels = cli.to_pixels_rescaled(x)
    assert pixels.amin(dim=(1, 2, 3)).tolist() == [0, 0, 0] and pixels.amax(dim=(1, 2, 3)).tolist() == [255, 255, 255]
    shifted = x + torch.tensor([8.0, -8.0, 0.5]).reshape(3, 1, 1, 1) # drifts far beyond any N(0, 1) pixel
    assert (cli.to_pixels_rescaled(shifted).int() - pixels.int()).abs().max() <= 1
    assert cli.to_pixels(shifted[:2]).float().std(dim=(1, 2, 3)).max() == 0, 'de-normalised, a drifted sample is one colour'
    real = torch.full((4, 1, 32, 32), -0.8) + 0.1 * torch.arange(4).reshape(4, 1, 1, 1) # means -0.8 ... -0.5
    drift = nano_metrics.mean_drift(torch.cat([real[:3], real[:1] + 2.0, real[:1] - 1.0]), real)
    assert drift['off_range_share'] == 0.4


def test_rescoring_reuses_the_samples(tmp_path):
    nano('--cond', 'shift', *TINY, '--epochs', 1, '--samples', 4, '--out', tmp_path)
    first = json.loads((tmp_path / 'metrics.json').read_text())
    again = nano('--cond', 'shift', *TINY, '--epochs', 1, '--samples', 4, '--out', tmp_path)
    assert 'reusing the 4 samples' in again.stdout and json.loads((tmp_path / 'metrics.json').read_text())['proxy_fid'] == first['proxy_fid']
    assert np.asarray(PIL.Image.open(tmp_path / 'samples-rescaled.png')).shape == (64, 16 * 64)
    assert 0 <= first['off_range_share'] <= 1 and 'proxy_fid_rescaled' in first


def test_omega_similarity_of_the_timelora_tables_at_init(tmp_path):
    # Interpolation: near steps share their two bases, steps 500 apart share none (bases are 111 apart).
    # Random N(0, 1) rows: near steps are no more alike than far ones.
    sys.path.insert(0, NANO)
    import nano as cli
    import nano_diffusion as nd
    for init, near_low, near_high, far_exact in [('interp', 0.8, 1.0, 0.0), ('random', -0.2, 0.2, None)]:
        torch.manual_seed(0)
        net = nd.MyTinyUNet(cond='timelora', omega_init=init)
        result = cli.omega_similarity(net, net, str(tmp_path / f'{init}.png'), init)
        assert near_low < result['omega_similarity_near'] < near_high, result
        assert result['omega_similarity_near'] == result['omega_similarity_near_at_init']
        if far_exact is not None:
            assert result['omega_similarity_far'] == far_exact
        else:
            assert abs(result['omega_similarity_far']) < 0.2
        saved = np.load(tmp_path / f'{init}.npz')
        assert saved['layers'].shape == (21, 100, 100) and np.allclose(np.diagonal(saved['mean']), 1, atol=1e-5)
