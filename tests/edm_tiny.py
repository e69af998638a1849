"""The tiny EDM training runs that the end-to-end tests share (test_edm_train.py, test_edm_transfer.py)."""

import os

import torch

from conftest import EDM, HELPERS, run_in

# A tiny DDPM++ (8 base channels, two levels, attention at 16x16) for 1 kimg (train.py's least): 20 steps of 50
# images (the 40 of the dataset, repeated; fewer, larger steps cost less time on a CPU).
TINY = ['--cond=1', '--arch=ddpmpp', '--cbase=8', '--cres=1,1', '--batch=50', '--duration=0.001',
        '--tick=1', '--snap=1', '--dump=1', '--workers=1', '--seed=0']
LORA = ['--lora=uc', '--lora-bases=3', '--lora-rank=2', '--lora-mlp=16,8']


def train(data, outdir, *extra):
    return run_in(EDM, ['train.py', f'--outdir={outdir}', '--nosubdir', f'--data={data}', *TINY, *extra])


def load(tree, path, tmp_path, tag, *flags):
    out = tmp_path / f'{tag}.pt'
    run_in(tree, [os.path.join(HELPERS, 'edm_load.py'), path, out, *flags])
    return torch.load(out)
