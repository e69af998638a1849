"""The mini digits (tools/data/mini_digits.py) and the digit detector that scores them
(tools/scoring/digit_detector.py, fid_digits.py): the data in both upstreams' formats, the
detector's accuracy, input and reproducibility, FID and KID through EDM's fid.py with it, and a few
steps of one mini row per upstream through its own training script."""

import gzip
import hashlib
import json
import struct
import os
import shlex
import zipfile

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

from conftest import EDM, EDM2, IDDPM, edm2_imported, run_in, tool
from tiny import load
from tools.data import mini_digits
from tools.data.dataset_check import DatasetError, check_edm_zip, check_image_folder, iddpm_image_files
from tools.data.mini_digits import held_out_mask, load_digits, pad, split, write_folder, write_mini_digits
from tools.paper.params import edm_network_kwargs
from tools.paper.rows import find, flag_value, override
from tools.scoring import digit_detector, fid_digits
from tools.scoring.digit_detector import (FEATURES, MIN_IMAGES, build_detector, detector_identity, digits_as_images, kid, predict,
                                          read_info, train_detector, weights_bytes)
from tools.scoring.fid_steps import compute_fid, reference_statistics

pytestmark = pytest.mark.first(60) # one of the longer modules, started early (seconds measured by --durations)

# Measured: 96.0% of the 1,000 held-out digits (8 epochs, seed 0); 94.6% to 96.8% over the variants
# tried (learning rate, epochs, kernel sizes). The margin allows another CPU's rounding.
MIN_ACCURACY = 0.94


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    top = tmp_path_factory.mktemp('mini')
    edm_zip, folder, held_out = write_mini_digits(str(top / 'digits.zip'), str(top / 'train'), str(top / 'held-out'))
    return dict(top=top, zip=edm_zip, train=folder, held_out=held_out, source=load_digits('mnist5k'))


@pytest.fixture(scope='module')
def detector(data):
    path = str(data['top'] / 'detector.pt')
    return path, build_detector(path)


def folder_images(folder):
    """uint8 [N, 3, 32, 32] of a folder's PNGs, sorted by name, read as EDM's ImageFolderDataset reads them
    (np.array of the PNG, channels first): what fid.py hands a detector."""
    names = sorted(name for name in os.listdir(folder) if name.endswith('.png'))
    return names, torch.from_numpy(np.stack([np.array(PIL.Image.open(os.path.join(folder, name))).transpose(2, 0, 1) for name in names]))


def test_data_pass_the_dataset_checks_with_the_split_and_labels(data):
    check_edm_zip(data['zip'], 32, 10)
    check_image_folder(data['train'], 32, 10)
    check_image_folder(data['held_out'], 32, 10)
    images, labels = data['source']
    held_out = held_out_mask(labels)
    for folder, count, in_held_out in [(data['train'], 4000, False), (data['held_out'], 1000, True)]:
        names = [os.path.basename(path) for path in iddpm_image_files(folder)]
        assert len(names) == count
        digits, indices = zip(*(os.path.splitext(name)[0].split('_') for name in names))
        indices = np.array(indices, dtype=int)
        assert (np.array(digits, dtype=int) == labels[indices]).all(), 'the class before "_" is the source label'
        assert (held_out[indices] == in_held_out).all() and len(set(indices)) == count
        assert np.bincount(labels[indices]).tolist() == [count // 10] * 10, '100 a class held out, the rest train'
    # The held-out digits are the first 100 of each class in the source's order (nano_data.split's rule).
    assert all((np.flatnonzero(labels == digit)[:100] == np.flatnonzero(held_out & (labels == digit))).all() for digit in range(10))
    with zipfile.ZipFile(data['zip']) as z:
        zip_labels = dict(json.loads(z.read('dataset.json'))['labels'])
    assert len(zip_labels) == 4000 and np.bincount(list(zip_labels.values())).tolist() == [400] * 10


def test_digits_are_padded_black_not_resized(data):
    images, labels = data['source']
    index = int(np.flatnonzero(~held_out_mask(labels))[123])
    pixels = np.array(PIL.Image.open(os.path.join(data['train'], f'{labels[index]}_{index:05d}.png')))
    assert pixels.shape == (32, 32, 3) and (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    assert (pixels[2:30, 2:30, 0] == images[index]).all(), 'the 28x28 digit itself, unscaled, in the centre'
    border = np.ones((32, 32), dtype=bool)
    border[2:30, 2:30] = False
    assert (pixels[border] == 0).all(), 'a black margin of 2 pixels'


def test_rerun_keeps_the_outputs_and_refuses_another_dataset(data, monkeypatch):
    before = {path: os.stat(path).st_mtime_ns for path in [data['zip'], data['train'], data['held_out']]}
    monkeypatch.setattr(mini_digits, 'load_digits', lambda source: pytest.fail('a rerun loads no digits'))
    assert write_mini_digits(data['zip'], data['train'], data['held_out']) == (data['zip'], data['train'], data['held_out'])
    assert {path: os.stat(path).st_mtime_ns for path in before} == before
    with pytest.raises(DatasetError, match='holds 1000 digits, not the 4000'):
        write_mini_digits(str(data['top'] / 'other.zip'), data['held_out'], data['held_out'])


def test_a_killed_write_leaves_no_folder_under_its_name(data, tmp_path, monkeypatch):
    images, labels = data['source']
    saved = []
    def save_then_fail(image, path, *args, **kwargs):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(path)
    monkeypatch.setattr(PIL.Image.Image, 'save', save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_folder(str(tmp_path / 'digits'), images[:10], labels[:10], np.arange(10))
    assert not os.path.exists(tmp_path / 'digits') and len(saved) == 5
    monkeypatch.undo()
    write_folder(str(tmp_path / 'digits'), images[:10], labels[:10], np.arange(10)) # the leftover .partial is replaced
    assert len(iddpm_image_files(tmp_path / 'digits')) == 10 and not os.path.exists(tmp_path / 'digits.partial')


def test_official_mnist_files_are_read_and_a_truncated_one_refused(tmp_path):
    # --source FOLDER: the idx files as `make data-mnist` writes them (here 20 made-up digits).
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>4I', 2051, 20, 28, 28) + images.tobytes())
    with gzip.open(tmp_path / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>2I', 2049, 20) + labels.astype(np.uint8).tobytes())
    read_images, read_labels = load_digits(str(tmp_path))
    assert (read_images == images).all() and (read_labels == labels).all() and read_labels.dtype == np.int64
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>4I', 2051, 20, 28, 28) + images.tobytes()[:-1])
    with pytest.raises(DatasetError, match='not an MNIST idx file of its stated size'):
        load_digits(str(tmp_path))


def test_detector_held_out_accuracy(data, detector):
    path, net = detector
    (_, _), (held_out_digits, held_out_labels) = split(*data['source'])
    accuracy = (predict(net, digits_as_images(held_out_digits)) == held_out_labels).mean()
    assert accuracy >= MIN_ACCURACY
    info = read_info(path)
    assert info['held_out_accuracy'] == round(accuracy, 4) and info['train_digits'] == 4000 and info['held_out_digits'] == 1000
    assert info['sha256'] == detector_identity(path)['sha256'] == hashlib.sha256(open(path, 'rb').read()).hexdigest()


def test_detector_reads_images_as_fid_py_hands_them(data, detector):
    path, net = detector
    names, images = folder_images(data['held_out'])
    indices = [int(os.path.splitext(name)[0].split('_')[1]) for name in names]
    digits = data['source'][0][indices]
    as_digits, as_fid_py = digits_as_images(digits), images
    assert as_fid_py.dtype == torch.uint8 and as_fid_py.shape == (1000, 3, 32, 32)
    assert (predict(net, as_fid_py) == predict(net, as_digits)).all()
    with torch.no_grad():
        assert torch.allclose(net(as_fid_py, return_features=True), net(as_digits, return_features=True), atol=1e-5)
    with pytest.raises(ValueError, match='uint8'):
        net(as_fid_py.float() / 255)


def test_training_twice_gives_the_same_weights(data):
    # A short training (500 digits, 1 epoch): the same code path as the full one, in a second.
    (digits, labels), _ = split(*data['source'])
    first = hashlib.sha256(weights_bytes(train_detector(digits[:500], labels[:500], epochs=1))).hexdigest()
    threads = torch.get_num_threads()
    torch.set_num_threads(2) # the training's own thread count, not the caller's, decides
    try:
        second = hashlib.sha256(weights_bytes(train_detector(digits[:500], labels[:500], epochs=1))).hexdigest()
    finally:
        torch.set_num_threads(threads)
    assert first == second


@pytest.fixture(scope='module')
def scored(data, detector, tmp_path_factory):
    """fid_digits.py through fid_steps, as scoring runs it (two fid.py processes, a few seconds each):
    reference statistics of the held-out digits, and the FID of the training digits against them."""
    top = tmp_path_factory.mktemp('scored')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('DIGIT_DETECTOR', detector[0])
        ref = reference_statistics(data['held_out'], str(top / 'held-out.npz'), 'digits')
        fid = compute_fid(data['train'], dict(detector='digits', ref=ref, images=MIN_IMAGES))
    return dict(ref=ref, fid=fid)


def noise_images(count):
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (count, 3, 32, 32), dtype=np.uint8))


def frechet(features, ref):
    """fid.py's Frechet distance of features to reference statistics, written out here."""
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    root = scipy.linalg.sqrtm(sigma @ ref['sigma']).real
    return float(np.square(mu - ref['mu']).sum() + np.trace(sigma + ref['sigma'] - 2 * root))


@pytest.mark.smoke # two fid.py processes: end to end (make smoke), not make test
def test_fid_through_fid_py_small_for_real_digits_large_for_noise(detector, scored):
    # Measured: 1.05 for 640 training digits against the held-out ones (0.89 for 1,000), 258 for noise.
    assert 0 < scored['fid'] < 2
    with torch.no_grad():
        noise = detector[1](noise_images(MIN_IMAGES), return_features=True).double().numpy()
    assert frechet(noise, np.load(scored['ref'])) > 100 * scored['fid']


@pytest.mark.smoke
def test_fid_py_statistics_are_the_detector_features(data, detector, scored):
    path, net = detector
    ref = np.load(scored['ref'])
    with torch.no_grad():
        features = net(folder_images(data['held_out'])[1], return_features=True).double().numpy()
    assert ref['mu'].shape == (FEATURES,) and ref['sigma'].shape == (FEATURES, FEATURES), 'cut back from the padding'
    assert np.allclose(ref['mu'], features.mean(0), atol=1e-6) and np.allclose(ref['sigma'], np.cov(features, rowvar=False), atol=1e-6)
    assert np.linalg.eigvalsh(ref['sigma']).min() > 0, 'full rank'


def test_too_few_images_refused_in_one_line():
    with pytest.raises(SystemExit, match=f'needs at least {MIN_IMAGES}'):
        fid_digits.refuse_too_few(lambda path: range(MIN_IMAGES - 1), 'images', None)
    fid_digits.refuse_too_few(lambda path: range(2 * MIN_IMAGES), 'images', MIN_IMAGES)


def test_kid_near_zero_for_one_distribution_positive_for_others(data, detector):
    path, net = detector
    (train, train_labels), (held_out, _) = split(*data['source'])
    with torch.no_grad():
        train_features, held_out_features, noise_features = [net(images, return_features=True).double().numpy()
                                                             for images in [digits_as_images(train), digits_as_images(held_out), noise_images(1000)]]
    same, same_std = kid(held_out_features, train_features, subsets=10)
    # Measured: 0.005 +- 0.003 (held-out vs training digits), 1.05 (digits 0-4 vs 5-9), 75 (noise).
    assert abs(same) < 0.03
    assert kid(train_features[train_labels < 5], train_features[train_labels >= 5], subsets=10)[0] > 0.5
    assert kid(noise_features, train_features, subsets=10)[0] > 10


def test_kid_is_the_unbiased_mmd_estimate():
    # One subset: the unbiased estimate of the squared MMD of the subsets kid draws, written out term by term.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 4)), rng.normal(0.5, 1, size=(30, 4))
    draws = np.random.default_rng(0) # kid's draws, seed 0: a's subset, then b's, of min(20, 30) each
    x, y = a[draws.choice(20, 20, replace=False)], b[draws.choice(30, 20, replace=False)]
    k = lambda u, v: (u @ v / 4 + 1) ** 3
    m = 20
    expected = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
                - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    assert kid(a, b, subsets=1)[0] == pytest.approx(expected, rel=1e-9)

#----------------------------------------------------------------------------
# One mini row per upstream through its own CLI, on the real digits: the command its driver prints (--dry-run),
# with this module's digits and folder. improved-diffusion and EDM2: two optimizer steps; EDM: train.py's dry run and
# the network it builds (train.py trains 1 kimg at the least: make smoke).

def driver_commands(upstream, dataset, variant, tmp_path):
    """{script: argv} of the upstream commands `python -m tools.drivers.<upstream>` prints for a mini row."""
    result = tool(f'drivers.{upstream}', dataset, f'--variant={variant}', '--seed=0', '--dry-run', f'--runs={tmp_path / "runs"}')
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [shlex.split(line.split('$ ', 1)[1]) for line in result.stdout.splitlines() if line.startswith('[vendor/')]
    return {os.path.basename(command[1]): command[2:] for command in commands}


def test_the_edm_mini_row_is_what_train_py_builds_and_its_network_runs_on_the_digits(data, tmp_path, monkeypatch):
    # EDM's train.py trains 1 kimg at the least (a minute and more on one core: the test below, in make smoke);
    # here its dry run with the row's flags, and the network it would build, on real digits.
    row = find('edm', 'mini-uncond', 'with-lora')
    flags = [flag for flag in driver_commands('edm', 'mini-uncond', 'with-lora', tmp_path)['train.py']
             if not flag.startswith(('--outdir=', '--data='))]
    result = run_in(EDM, ['train.py', f'--outdir={tmp_path / "run"}', '--nosubdir', f'--data={data["zip"]}', *flags, '--dry-run'])
    printed = result.stdout
    options = json.loads(printed[printed.index('Training options:') + len('Training options:'):printed.index('Output directory:')])
    assert options['batch_size'] == int(flag_value(row.flags, '--batch')) and options['lr_rampup_kimg'] == float(flag_value(row.flags, '--lr-rampup'))
    assert options['ema_halflife_kimg'] == 1000 * float(flag_value(row.flags, '--ema')) and 'augment_kwargs' not in options
    assert options['total_kimg'] == round(1000 * float(flag_value(row.flags, '--duration')))
    # The network train.py would build is the one make params counts for the row (tools.paper.params, from the flags).
    network = dict(options['network_kwargs'], img_resolution=32, img_channels=3, label_dim=0)
    counted = edm_network_kwargs(row)
    assert counted.pop('augment_dim') == 0 and 'augment_dim' not in network, 'no augmentation: no augmentation labels'
    assert {name: network.get(name) for name in counted} == counted
    monkeypatch.syspath_prepend(EDM)
    import dnnlib
    net = dnnlib.util.construct_class_by_name(**network)
    with zipfile.ZipFile(data['zip']) as z:
        names = sorted(name for name in z.namelist() if name.endswith('.png'))[:4]
        digits = torch.stack([torch.from_numpy(np.array(PIL.Image.open(z.open(name)))).permute(2, 0, 1) for name in names])
    images = digits.float() / 127.5 - 1
    denoised = net(images + torch.randn_like(images), torch.ones(4))
    denoised.square().mean().backward()
    assert denoised.shape == images.shape and torch.isfinite(denoised).all()
    assert all(param.grad is not None for name, param in net.named_parameters() if 'lora_' in name), 'the LoRA layers are in the graph'


@pytest.mark.smoke # 1 kimg (train.py's least) of the mini network: over a minute on one core
def test_the_edm_mini_row_trains_through_train_py_at_its_size_and_ramp(data, tmp_path):
    row = find('edm', 'mini-uncond', 'with-lora')
    flags = [flag for flag in driver_commands('edm', 'mini-uncond', 'with-lora', tmp_path)['train.py']
             if not flag.startswith(('--outdir=', '--data='))]
    # EDM's train.py trains 1 kimg at the least: two steps of 500 images (click keeps the last --batch, --duration).
    run_in(EDM, ['train.py', f'--outdir={tmp_path / "run"}', '--nosubdir', f'--data={data["zip"]}', *flags, '--batch=500', '--duration=0.001', '--workers=0'])
    state = load(EDM, str(tmp_path / 'run' / 'training-state-000001.pt'), tmp_path, 'state')
    # The learning rate of the second step: EDM's 1e-3 ramped over --lr-rampup kimg from the 500 images seen
    # before it (EDM's fixed ramp of 10 Mimg would give 1e-3 * 500 / 1e7).
    rampup_images = float(flag_value(row.flags, '--lr-rampup')) * 1000
    assert [group['lr'] for group in state['optimizer']['param_groups']] == pytest.approx([1e-3 * 500 / rampup_images])
    weights = state['net']
    # The mini size: --cbase channels at 32x32, --blocks blocks a resolution, the paper's UC-LoRA in the attention.
    assert weights['model.enc.32x32_conv.weight'].shape[0] == int(flag_value(row.flags, '--cbase'))
    blocks = {name.split('.')[2] for name in weights if name.startswith('model.enc.16x16_block')}
    assert blocks == {f'16x16_block{index}' for index in range(int(flag_value(row.flags, '--blocks')))}
    assert any('lora' in name for name in weights)


def test_the_iddpm_mini_row_trains_through_image_train_py_reproducibly_by_seed(data, tmp_path):
    flags = driver_commands('iddpm', 'mini-uncond', 'with-lora', tmp_path)['image_train.py']
    flags = list(override(flags, ('--data_dir', data['train'], '--lr_anneal_steps', 2)))
    weights = []
    for attempt in ['first', 'second']:
        run_in(IDDPM, ['scripts/image_train.py', *flags], env=dict(OPENAI_LOGDIR=str(tmp_path / attempt)))
        ema = sorted(name for name in os.listdir(tmp_path / attempt) if name.startswith('ema_'))
        assert ema == [f'ema_{flag_value(flags, "--ema_rate")}_{step:06d}.pt' for step in (0, 2)]
        weights.append(torch.load(tmp_path / attempt / ema[-1]))
    # The same --seed, the same data order, noise and initial weights: the same network.
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    # The mini size: --num_channels at the input, --num_res_blocks a level, the paper's TimeLoRA.
    assert weights[0]['input_blocks.0.0.weight'].shape[0] == int(flag_value(flags, '--num_channels'))
    assert not any(name.startswith('input_blocks.2.0.in_layers') for name in weights[0]), 'one res block, then a downsample'
    assert any('lora' in name for name in weights[0])


def test_the_edm2_mini_row_trains_through_train_edm2_py_at_its_size_and_ramp(data, tmp_path):
    row = find('edm2', 'mini-uncond', 'with-lora')
    flags = [flag for flag in driver_commands('edm2', 'mini-uncond', 'with-lora', tmp_path)['train_edm2.py']
             if not flag.startswith(('--outdir=', '--data='))]
    batch = int(flag_value(flags, '--batch'))
    # Two steps (click keeps the last --duration); EDM2 writes a training state when it ends.
    run_in(EDM2, ['train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={data["zip"]}', *flags, f'--duration={2 * batch}'])
    with edm2_imported(EDM2): # its training state holds dnnlib's EasyDicts
        state = torch.load(tmp_path / 'run' / 'training-state-0000000.pt', weights_only=False) # named by kimg: 64 images
    # The second step's learning rate: the preset's 0.01 ramped over --lr-rampup Mimg from the images seen before it.
    rampup_images = float(flag_value(row.flags, '--lr-rampup')) * 1e6
    assert [group['lr'] for group in state['optimizer']['param_groups']] == pytest.approx([0.01 * batch / rampup_images])
    assert state['state']['cur_nimg'] == 2 * batch
    weights = state['net']
    # The mini size: --channels at 32x32, --blocks blocks a resolution, attention (and the paper's UC-LoRA) at 16x16 and 8x8.
    assert weights['unet.enc.32x32_conv.weight'].shape[0] == int(flag_value(row.flags, '--channels'))
    blocks = {name.split('.')[2] for name in weights if name.startswith('unet.enc.16x16_block')}
    assert blocks == {f'16x16_block{index}' for index in range(int(flag_value(row.flags, '--blocks')))}
    assert any(name.startswith('unet.enc.16x16_block0.attn_qkv_lora.') for name in weights)
    assert any(name.startswith('unet.enc.8x8_block0.attn_proj_lora.') for name in weights)
