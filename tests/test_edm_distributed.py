"""Two processes on CPU (torchrun, gloo) train EDM with UC-LoRA and end with identical parameters."""

import os
import sys

import pytest
import torch

from conftest import EDM, HELPERS, run_in
from tiny import EDM_TRAIN, EDM_TRAIN_LORA

# Two training processes on the 2 cores that make test shares between its workers: about 45 s, so make smoke runs it.
pytestmark = pytest.mark.smoke


def test_two_ranks_end_with_identical_parameters(edm_dataset, tmp_path):
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    result = run_in(EDM, [os.path.join(HELPERS, 'edm_train_capture.py'), 'end', tmp_path / 'rank{rank}.pt', '--',
                          f'--outdir={tmp_path / "run"}', '--nosubdir', f'--data={edm_dataset}', *EDM_TRAIN, *EDM_TRAIN_LORA],
                    launcher=torchrun)
    assert 'Number of GPUs:          2' in result.stdout
    rank0, rank1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    assert any(name.endswith('lora_B') for name in rank0['net'])
    for name, value in rank0['net'].items():
        assert torch.equal(rank1['net'][name], value), name
    # Each rank saw its own half of every batch, yet the updates were the same: the gradients were averaged.
    assert any(torch.count_nonzero(value) for name, value in rank0['net'].items() if name.endswith('lora_B'))
    assert (tmp_path / 'run' / 'network-snapshot-000001.pkl').exists()
