"""improved-diffusion survives SIGKILL: sampling into --sample_dir resumes to the same batches, and a
checkpoint killed mid-write is never taken as complete (patches 0005 and 0007, tools/drivers/iddpm.py)."""

import glob
import os
import signal
import sys

import numpy as np
import pytest
import torch

from conftest import IDDPM, run_in
from tiny import IDDPM_TINY, iddpm_flags
from tools import ROOT
from tools.data.synthetic import write_folder
from tools.drivers.iddpm import resumable_checkpoint

sys.path.insert(0, IDDPM)
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402

MODEL = dict(IDDPM_TINY, learn_sigma=False, diffusion_steps=10, class_cond=True, num_classes=10)
MODEL_FLAGS = iddpm_flags(MODEL)
SAMPLING = ['--num_samples', 7, '--batch_size', 3, '--seed', 5] # batches of 3, 3 and 1
BATCHES = ['batch_000000.npz', 'batch_000001.npz', 'batch_000002.npz']
KILL_MIDWRITE = [sys.executable, os.path.join(ROOT, 'tools', 'checks', 'kill_midwrite.py')]
MPIEXEC = [os.path.join(os.path.dirname(sys.executable), 'mpiexec'), '-n', '2', sys.executable]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A model file of the tiny class-conditional network, its weights perturbed so that its output is
    not zero (upstream zero-initializes the last layer) and the samples depend on the network."""
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**dict(model_and_diffusion_defaults(), **MODEL))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path_factory.mktemp('iddpm-model') / 'model000000.pt'
    torch.save(model.state_dict(), path)
    return path


def sample(checkpoint, sample_dir, logdir, killed_at=None, launcher=None):
    """scripts/image_sample.py into sample_dir; killed_at: SIGKILL it while it writes that file."""
    script = ['scripts/image_sample.py'] if killed_at is None else [killed_at, '--', 'scripts/image_sample.py']
    return run_in(IDDPM, [*script, '--model_path', checkpoint, *MODEL_FLAGS, *SAMPLING, '--sample_dir', sample_dir],
                  launcher=launcher or (KILL_MIDWRITE if killed_at else None), expect_ok=killed_at is None,
                  env=dict(OPENAI_LOGDIR=str(logdir)))


@pytest.fixture(scope='module')
def uninterrupted(checkpoint, tmp_path_factory):
    top = tmp_path_factory.mktemp('iddpm-sampling')
    sample(checkpoint, top / 'batches', top / 'log')
    return {name: dict(np.load(top / 'batches' / name)) for name in sorted(os.listdir(top / 'batches'))}


def assert_same_batches(folder, reference):
    assert sorted(os.listdir(folder)) == BATCHES, 'no temporary file left behind'
    for name, arrays in reference.items():
        with np.load(folder / name) as batch:
            assert list(batch) == ['arr_0', 'arr_1']
            assert np.array_equal(batch['arr_0'], arrays['arr_0']), name
            assert np.array_equal(batch['arr_1'], arrays['arr_1']), name


def test_batches_hold_exactly_num_samples_images_and_labels(uninterrupted):
    assert list(uninterrupted) == BATCHES
    assert [batch['arr_0'].shape for batch in uninterrupted.values()] == [(3, 32, 32, 3), (3, 32, 32, 3), (1, 32, 32, 3)]
    assert all(batch['arr_0'].dtype == np.uint8 for batch in uninterrupted.values())
    labels = np.concatenate([batch['arr_1'] for batch in uninterrupted.values()])
    assert labels.shape == (7,) and labels.max() < 10
    images = np.concatenate([batch['arr_0'] for batch in uninterrupted.values()])
    assert len({image.tobytes() for image in images}) == 7, 'every batch from its own seed'


def test_a_run_killed_mid_write_resumes_to_the_same_batches(checkpoint, uninterrupted, tmp_path):
    killed = sample(checkpoint, tmp_path / 'batches', tmp_path / 'log', killed_at='batch_000001')
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert sorted(os.listdir(tmp_path / 'batches')) == ['batch_000000.npz', 'batch_000001.npz.partial'], 'the partial file has a temporary name'

    resumed = sample(checkpoint, tmp_path / 'batches', tmp_path / 'log')
    assert 'skipping batches [0]' in resumed.stdout, 'batch 0 kept; the partial batch 1 drawn again'
    assert_same_batches(tmp_path / 'batches', uninterrupted)
    assert os.listdir(tmp_path / 'log') and not glob.glob(str(tmp_path / 'log' / 'samples_*.npz')), 'the batch files are the result'


def test_two_processes_draw_the_same_batches_as_one(checkpoint, uninterrupted, tmp_path):
    sample(checkpoint, tmp_path / 'batches', tmp_path / 'log', launcher=MPIEXEC)
    assert_same_batches(tmp_path / 'batches', uninterrupted)


def test_a_checkpoint_killed_mid_write_is_never_resumed_from(tmp_path):
    """A real training run saves steps 0 and 2 and dies writing opt000002.pt: no file under that name,
    every checkpoint file present loads, and the driver resumes from step 0."""
    write_folder(tmp_path / 'images', count=4, resolution=32)
    flags = ['--data_dir', tmp_path / 'images', *MODEL_FLAGS, '--batch_size', 2, '--save_interval', 2, '--lr_anneal_steps', 3]
    killed = run_in(IDDPM, ['opt000002', '--', 'scripts/image_train.py', *flags], launcher=KILL_MIDWRITE, expect_ok=False,
                    env=dict(OPENAI_LOGDIR=str(tmp_path / 'run')))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    written = sorted(name for name in os.listdir(tmp_path / 'run') if '.pt' in name)
    assert written == ['ema_0.9999_000000.pt', 'ema_0.9999_000002.pt', 'model000000.pt', 'model000002.pt', 'opt000000.pt', 'opt000002.pt.partial']
    for name in written[:-1]:
        torch.load(tmp_path / 'run' / name)
    assert resumable_checkpoint(tmp_path / 'run') == str(tmp_path / 'run' / 'model000000.pt')


def test_resume_takes_the_newest_step_with_every_file(tmp_path):
    assert resumable_checkpoint(tmp_path) is None
    for name in ['model000002.pt', 'ema_0.9999_000002.pt', 'ema_0.99_000002.pt', 'opt000002.pt',
                 'model000004.pt', 'ema_0.9999_000004.pt', 'ema_0.99_000004.pt', 'opt000004.pt.partial',
                 'model000006.pt', 'ema_0.9999_000006.pt', 'opt000006.pt']:
        (tmp_path / name).touch()
    # Step 4 lacks its optimizer state (opt only as a temporary file), step 6 its second EMA.
    assert resumable_checkpoint(tmp_path) == str(tmp_path / 'model000002.pt')
