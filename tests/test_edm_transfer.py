"""End to end on CPU: EDM's train.py transferring a baseline snapshot into a UC-LoRA network, and LoRA-only fine-tuning
(one run of both: its state at the first step, then at its end)."""

import os
import pickle

import pytest
import torch

from conftest import EDM, HELPERS, run_in
from tiny import EDM_TRAIN, EDM_TRAIN_LORA, train

pytestmark = pytest.mark.first(71) # one of the longest modules, started early (seconds measured by --durations)


@pytest.fixture(scope='module')
def baseline(edm_dataset, tmp_path_factory):
    """The snapshot of a tiny baseline run (no LoRA), to transfer from."""
    run_dir = tmp_path_factory.mktemp('baseline-run')
    train(edm_dataset, run_dir)
    return run_dir / 'network-snapshot-000001.pkl'


@pytest.fixture(scope='module')
def finetune(baseline, edm_dataset, tmp_path_factory):
    """A LoRA-only fine-tuning run from the baseline's snapshot, its state at the first step saved on the way:
    (run folder, train.py's output, that state)."""
    folder = tmp_path_factory.mktemp('finetune')
    result = run_in(EDM, [os.path.join(HELPERS, 'edm_train_capture.py'), 'first-step-then-on', folder / 'first-step.pt', '--',
                          f'--outdir={folder}', '--nosubdir', f'--data={edm_dataset}', *EDM_TRAIN, *EDM_TRAIN_LORA, '--finetune=True',
                          f'--transfer={baseline}'])
    return folder, result, torch.load(folder / 'first-step.pt')


def test_transfer_copies_the_base_and_keeps_the_lora_init(baseline, finetune, monkeypatch):
    started = finetune[2]
    monkeypatch.syspath_prepend(EDM)
    source = pickle.loads(baseline.read_bytes())['ema'].state_dict()
    for name, value in source.items(): # attention weights included: names are unchanged
        assert torch.equal(started['net'][name], value), name
        assert torch.equal(started['ema'][name], value), name
    assert any(name.endswith('.qkv.weight') for name in source)
    added = [name for name in started['net'] if name not in source]
    assert added and all('lora_' in name for name in added)
    assert all(torch.count_nonzero(started['net'][name]) == 0 for name in added if name.endswith(('lora_B', 'lora_bias')))
    assert all(torch.count_nonzero(started['net'][name]) > 0 for name in added if name.endswith('lora_A'))


def test_finetuning_trains_the_lora_layers_only(baseline, finetune, monkeypatch):
    folder, result, _ = finetune
    monkeypatch.syspath_prepend(EDM) # read the files here (their classes come from EDM's tree): quicker than a process each
    state = torch.load(folder / 'training-state-000001.pt', weights_only=False)
    state = dict(net=state['net'].state_dict(), optimizer=state['optimizer_state'])
    ema, source = [pickle.loads(path.read_bytes())['ema'].state_dict() for path in [folder / 'network-snapshot-000001.pkl', baseline]]

    # After 20 optimiser steps, every base parameter is still the transferred one, in the network and in its EMA.
    for name, value in source.items():
        assert torch.equal(state['net'][name], value), name
        assert torch.equal(ema[name], value), name
    lora = [name for name in state['net'] if name not in source]
    assert lora and all('lora_' in name for name in lora)
    assert all(torch.count_nonzero(state['net'][name]) > 0 for name in lora if name.endswith(('lora_B', 'lora_bias'))), 'LoRA trained away from zero'
    assert len(state['optimizer']['state']) == len([name for name in lora if 'lora_' in name]), 'Adam keeps state for the LoRA parameters only'

    # The log says how many parameters train: the LoRA layers' own.
    trainable = sum(state['net'][name].numel() for name in lora)
    total = trainable + sum(value.numel() for name, value in source.items() if name.endswith(('weight', 'bias')))
    assert f'LoRA-only fine-tuning: training {trainable:,} of {total:,} parameters' in result.stdout
