"""End to end on CPU: improved-diffusion's own scripts with TimeLoRA + ClassLoRA, at tiny size."""

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from conftest import HELPERS, IDDPM, run_in
from tiny import IDDPM_TINY, iddpm_flags
from tools.data.synthetic import write_folder

pytestmark = pytest.mark.first(80) # one of the longest modules, started early (seconds measured by --durations)

MODEL = iddpm_flags(dict(IDDPM_TINY, diffusion_steps=101, class_cond=True, num_classes=10,
                        time_lora=True, class_lora=True, lora_bases=5, lora_rank=2))
TRAIN = ['--batch_size', 4, '--log_interval', 1, '--save_interval', 2]
MPIEXEC = [os.path.join(os.path.dirname(sys.executable), 'mpiexec'), '-n', '2', sys.executable]


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp('iddpm-data') / 'images'
    write_folder(folder, count=20, resolution=32)
    return folder


def train(logdir, images, *extra, launcher=None, helper=None):
    script = helper or ['scripts/image_train.py']
    return run_in(IDDPM, [*script, '--data_dir', images, *MODEL, *TRAIN, *extra], launcher=launcher, env=dict(OPENAI_LOGDIR=str(logdir)))


@pytest.fixture(scope='module')
def run(images, tmp_path_factory):
    logdir = tmp_path_factory.mktemp('iddpm-run')
    train(logdir, images, '--lr_anneal_steps', 3)
    return logdir


def test_training_writes_checkpoints_and_lora_learns(run):
    assert {'model000002.pt', 'opt000002.pt', 'ema_0.9999_000002.pt'} <= set(os.listdir(run))
    state = torch.load(run / 'model000002.pt')
    lora_B = [value for name, value in state.items() if name.endswith('lora_B')]
    assert len(lora_B) == 2 * 7, 'qkv and proj_out of 7 AttentionBlocks (16x16 and 8x8, one res block a level)'
    assert all(torch.count_nonzero(value) for value in lora_B), 'gradients reach the LoRA up-projections'
    tables = [value for name, value in state.items() if name.endswith('lora_table.weight')]
    assert all(value.shape == (101, 5) for value in tables) and len(tables) == 14


def test_resume_restores_model_optimizer_ema_and_step(run, images, tmp_path):
    out = tmp_path / 'first-step.pt'
    train(tmp_path / 'log', images, '--resume_checkpoint', run / 'model000002.pt', '--lr_anneal_steps', 5,
          helper=[os.path.join(HELPERS, 'iddpm_train_capture.py'), 'first-step', out, '--'])
    resumed = torch.load(out)
    assert resumed['resume_step'] == 2
    for name, value in torch.load(run / 'model000002.pt').items():
        assert torch.equal(resumed['model'][name], value), name
    for name, value in torch.load(run / 'ema_0.9999_000002.pt').items():
        assert torch.equal(resumed['ema'][0.9999][name], value), name
    saved_opt = torch.load(run / 'opt000002.pt')
    for index, state in saved_opt['state'].items():
        for key, value in state.items():
            assert torch.equal(resumed['optimizer']['state'][index][key], value), (index, key)

    # The real continuation, up to step 4.
    train(tmp_path / 'continued', images, '--resume_checkpoint', run / 'model000002.pt', '--lr_anneal_steps', 5)
    assert 'model000004.pt' in os.listdir(tmp_path / 'continued')


def test_respaced_sampling_writes_an_npz(run, tmp_path):
    run_in(IDDPM, ['scripts/image_sample.py', '--model_path', run / 'model000002.pt', *MODEL, '--timestep_respacing', 50,
                   '--num_samples', 6, '--batch_size', 3], env=dict(OPENAI_LOGDIR=str(tmp_path)))
    samples = np.load(tmp_path / 'samples_6x32x32x3.npz')
    assert samples['arr_0'].shape == (6, 32, 32, 3) and samples['arr_0'].dtype == np.uint8
    assert samples['arr_1'].shape == (6,) and samples['arr_1'].max() < 10, 'labels drawn below --num_classes'


@pytest.mark.gpu # improved-diffusion's scripts take the GPU where there is one: make gpu-check runs this there
@pytest.mark.smoke # float16 on a CPU is emulated and slow: make smoke runs it there, not make test
def test_fp16_training_and_sampling_with_lora(images, tmp_path):
    # --use_fp16 True: improved-diffusion's convolutions in float16, fp32 master weights and loss scaling (fp16_util).
    # The LoRA layers keep float32 parameters, compute in their input's float16, and learn through the master weights.
    train(tmp_path, images, '--lr_anneal_steps', 3, '--use_fp16', True) # a step may be skipped: fp16_util starts at a loss scale that overflows
    state = torch.load(tmp_path / 'model000002.pt')
    lora = {name: value for name, value in state.items() if 'lora_' in name}
    assert lora and all(value.dtype == torch.float32 for value in lora.values())
    assert all(torch.count_nonzero(value) for name, value in lora.items() if name.endswith('lora_B')), 'the up-projections left zero'
    run_in(IDDPM, ['scripts/image_sample.py', '--model_path', tmp_path / 'model000002.pt', *MODEL, '--use_fp16', True,
                   '--timestep_respacing', 5, '--num_samples', 2, '--batch_size', 2], env=dict(OPENAI_LOGDIR=str(tmp_path)))
    samples = np.load(tmp_path / 'samples_2x32x32x3.npz')['arr_0']
    assert samples.shape == (2, 32, 32, 3) and len(np.unique(samples)) > 10


def test_two_mpi_ranks_end_with_identical_parameters(images, tmp_path):
    result = train(tmp_path / 'log', images, '--lr_anneal_steps', 3, launcher=MPIEXEC,
                   helper=[os.path.join(HELPERS, 'iddpm_train_capture.py'), 'end', tmp_path / 'rank{rank}.pt', '--'])
    assert 'will not be synchronized' not in result.stdout
    rank0, rank1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    assert any(torch.count_nonzero(value) for name, value in rank0['model'].items() if name.endswith('lora_B'))
    for name, value in rank0['model'].items():
        assert torch.equal(rank1['model'][name], value), name


BAD_FLAGS = [
    (['--lora_rank', 0], '--lora_rank, --lora_bases and --num_classes must be at least 1'),
    (['--lora_bases', 'many'], "argument --lora_bases: invalid int value: 'many'"),
    (['--lora_table_init', 'zeros'], '--lora_table_init must be one of interp, random'),
    (['--class_cond', False], '--class_lora True needs --class_cond True'),
    (['--time_lora', False, '--conv_cond', False], '--conv_cond False needs --time_lora True'),
    (['--class_lora', False, '--conv_cond', False], '--conv_cond False with --class_cond True needs --class_lora True'),
    (['--time_lora', 'maybe'], "argument --time_lora: boolean value expected"),
]
SCRIPTS = {'image_train.py': ['--data_dir', 'unused'], 'image_sample.py': []}


@pytest.mark.parametrize('script', SCRIPTS)
@pytest.mark.parametrize('flags,message', BAD_FLAGS)
def test_bad_flags_are_argparse_errors(script, flags, message, monkeypatch, capsys):
    monkeypatch.syspath_prepend(IDDPM)
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(IDDPM, 'scripts', script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, 'argv', [script, *SCRIPTS[script], *[str(flag) for flag in MODEL + flags]])
    with pytest.raises(SystemExit) as exit:
        module.main()
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_flag_on_the_command_line_is_one_usage_message(tmp_path):
    flags, message = BAD_FLAGS[0]
    for script, extra in SCRIPTS.items():
        result = run_in(IDDPM, [f'scripts/{script}', *extra, *MODEL, *flags], expect_ok=False, env=dict(OPENAI_LOGDIR=str(tmp_path)))
        assert result.returncode == 2 and message in result.stdout and 'Traceback' not in result.stdout
