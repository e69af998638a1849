"""End to end on CPU: EDM's own train.py, generate.py and pickles with UC-LoRA, at tiny size."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import EDM, HELPERS, PRISTINE_EDM, cuda_only, run_in
from tiny import EDM_TRAIN, EDM_TRAIN_LORA, load, train

pytestmark = pytest.mark.first(100) # one of the longest modules, started early (seconds measured by --durations)


@pytest.fixture(scope='module')
def lora_run(edm_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('lora-run')
    train(edm_dataset, run_dir, *EDM_TRAIN_LORA, '--lr-rampup=1') # the ramp-up over this run's 1 kimg (patch 0005)
    return run_dir


def test_flags_are_recorded_and_lora_trains(lora_run, tmp_path, monkeypatch):
    with open(lora_run / 'training_options.json') as f:
        options = json.load(f)
    network_kwargs = options['network_kwargs']
    assert network_kwargs['lora'] == 'uc' and network_kwargs['lora_bases'] == 3 and network_kwargs['lora_rank'] == 2
    assert network_kwargs['lora_mlp'] == [16, 8] and network_kwargs['conv_cond'] is True
    ema = load(EDM, lora_run / 'network-snapshot-000001.pkl', tmp_path, 'ema')['ema']
    lora_B = [value for name, value in ema.items() if name.endswith('lora_B')]
    assert len(lora_B) == 2 * 6, 'qkv and proj of 4 encoder blocks at 16x16, the 8x8 bottleneck and the last decoder block'
    assert all(torch.count_nonzero(value) > 0 for value in lora_B), 'gradients reach the LoRA up-projections'
    # --lr-rampup=1: the last of the 20 steps of 50 images trains at EDM's 1e-3 times 950 / 1000 images (EDM's
    # fixed ramp-up of 10 Mimg would give a ten-thousandth of it).
    monkeypatch.syspath_prepend(EDM)
    state = torch.load(lora_run / 'training-state-000001.pt', weights_only=False)
    assert options['lr_rampup_kimg'] == 1
    assert [group['lr'] for group in state['optimizer_state']['param_groups']] == pytest.approx([1e-3 * 950 / 1000])


def test_pristine_edm_loads_and_samples_the_snapshot(lora_run, tmp_path):
    snapshot = lora_run / 'network-snapshot-000001.pkl'
    pristine = load(PRISTINE_EDM, snapshot, tmp_path, 'pristine', '--sample')
    patched = load(EDM, snapshot, tmp_path, 'patched', '--sample')
    assert any(name.endswith('qkv.lora_A') for name in pristine['ema'])
    assert pristine['samples'].shape == (4, 3, 16, 16) and torch.isfinite(pristine['samples']).all()
    assert torch.equal(pristine['samples'], patched['samples'])


def test_generate_writes_images(lora_run, tmp_path):
    run_in(EDM, ['generate.py', f'--network={lora_run / "network-snapshot-000001.pkl"}', f'--outdir={tmp_path}',
                 '--seeds=0-5', '--batch=3', '--steps=4'])
    assert sorted(os.listdir(tmp_path)) == [f'{seed:06d}.png' for seed in range(6)]


@cuda_only
def test_fp16_training_and_sampling_with_lora_on_cuda(edm_dataset, tmp_path):
    # --fp16=True: EDMPrecond runs the U-Net in float16 on CUDA only (on the CPU the flag changes nothing), LoRA layers
    # included; train.py and generate.py as a user runs them, on the GPU they pick.
    train(edm_dataset, tmp_path / 'run', *EDM_TRAIN_LORA, '--fp16=True')
    with open(tmp_path / 'run' / 'training_options.json') as f:
        assert json.load(f)['network_kwargs']['use_fp16'] is True
    with open(tmp_path / 'run' / 'stats.jsonl') as f:
        losses = [json.loads(line)['Loss/loss']['mean'] for line in f]
    assert losses and all(np.isfinite(losses))
    snapshot = tmp_path / 'run' / 'network-snapshot-000001.pkl'
    ema = load(EDM, snapshot, tmp_path, 'ema')['ema']
    assert all(torch.count_nonzero(value) > 0 for name, value in ema.items() if name.endswith('lora_B')), 'the LoRA layers learn in float16'
    run_in(EDM, ['generate.py', f'--network={snapshot}', f'--outdir={tmp_path / "images"}', '--seeds=0-3', '--batch=4', '--steps=4'])
    assert sorted(os.listdir(tmp_path / 'images')) == [f'{seed:06d}.png' for seed in range(4)]


def test_resume_restores_network_ema_optimizer_and_progress(lora_run, edm_dataset, tmp_path, monkeypatch):
    # One run: its state at the first step saved, then on to 2 kimg.
    state_dump = lora_run / 'training-state-000001.pt'
    first_step = tmp_path / 'first-step.pt'
    run_in(EDM, [os.path.join(HELPERS, 'edm_train_capture.py'), 'first-step-then-on', first_step, '--', f'--outdir={tmp_path / "resumed"}',
                 '--nosubdir', f'--data={edm_dataset}', *EDM_TRAIN, *EDM_TRAIN_LORA, '--duration=0.002', f'--resume={state_dump}'])
    resumed = torch.load(first_step)
    monkeypatch.syspath_prepend(EDM) # read the files here (their classes come from EDM's tree): quicker than a process each
    state = torch.load(state_dump, weights_only=False)
    saved = dict(net=state['net'].state_dict(), optimizer=state['optimizer_state'])
    saved_ema = pickle.loads((lora_run / 'network-snapshot-000001.pkl').read_bytes())['ema'].state_dict()
    for name, value in saved['net'].items():
        assert torch.equal(resumed['net'][name], value), name
        assert torch.equal(resumed['ema'][name], saved_ema[name]), name
    assert resumed['optimizer']['state'].keys() == saved['optimizer']['state'].keys()
    for index, state in saved['optimizer']['state'].items():
        for key, value in state.items():
            assert torch.equal(resumed['optimizer']['state'][index][key], value), (index, key)

    # And the continuation: progress goes on from 1 kimg to 2 kimg.
    with open(tmp_path / 'resumed' / 'stats.jsonl') as f:
        kimg = [json.loads(line)['Progress/kimg']['mean'] for line in f]
    assert kimg[0] == pytest.approx(1.05) and kimg[-1] == pytest.approx(2.0), 'the first tick ends after one step of 50 images'
    assert (tmp_path / 'resumed' / 'network-snapshot-000002.pkl').exists()


BAD_FLAGS = [
    (['--lora=lorax'], "Invalid value for '--lora'"),
    (['--lora=uc', '--lora-rank=0'], "Invalid value for '--lora-rank'"),
    (['--lora=uc', '--lora-bases=-3'], "Invalid value for '--lora-bases'"),
    (['--lora=uc', '--lora-mlp=128,x'], "Invalid value for '--lora-mlp'"),
    (['--lora=uc', '--lora-mlp=128,0'], 'composition MLP widths must be positive integers'),
    (['--lora=uc', '--arch=adm', '--cbase=32', '--cres=1'], 'DhariwalUNet has no attention layers'), # 32 channels < one 64-channel head
    (['--conv-cond=False'], '--conv-cond=False needs --lora=uc or --adaln=True'),
    (['--lora=class', '--cond=True', '--conv-cond=False'], '--conv-cond=False needs --lora=uc or --adaln=True'),
    (['--adaln=True', '--lora=uc'], 'adaLN and LoRA condition the same attention layers'),
    (['--adaln=sometimes'], "Invalid value for '--adaln'"),
    (['--lora=class'], 'ClassLoRA needs class labels'), # the dataset is unconditional unless --cond=True
    (['--finetune=True'], '--finetune=True trains the LoRA layers only: it needs --lora'),
    (['--conv-cond=maybe'], "Invalid value for '--conv-cond'"),
    (['--lora=uc', '--lora-scale=learned'], "Invalid value for '--lora-scale'"),
]


@pytest.fixture
def edm_train(monkeypatch):
    """EDM's train.py, imported into this process, with its process-wide set-up (start method,
    process group) made harmless: the options are checked before training would need either."""
    monkeypatch.syspath_prepend(EDM)
    import train
    from torch_utils import distributed
    monkeypatch.setattr(train.torch.multiprocessing, 'set_start_method', lambda method: None)
    monkeypatch.setattr(distributed, 'init', lambda: None)
    return train


@pytest.mark.parametrize('flags,message', BAD_FLAGS)
def test_bad_flags_are_usage_errors(flags, message, edm_train, edm_dataset, tmp_path):
    from click.testing import CliRunner
    result = CliRunner().invoke(edm_train.main, [f'--outdir={tmp_path}', f'--data={edm_dataset}', '--dry-run', *flags])
    assert result.exit_code == 2, result.output
    assert message.replace("'", '') in result.output.replace("'", '')


def test_a_bad_flag_on_the_command_line_is_one_usage_message(edm_dataset, tmp_path):
    flags, message = BAD_FLAGS[0] # rejected by click before train.py starts its process group
    result = run_in(EDM, ['train.py', f'--outdir={tmp_path}', f'--data={edm_dataset}', '--dry-run', *flags], expect_ok=False)
    assert result.returncode == 2 and message.replace("'", '') in result.stdout.replace("'", '') and 'Traceback' not in result.stdout
