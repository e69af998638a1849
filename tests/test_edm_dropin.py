"""Drop-in: the patched EDM against a pristine clone at the pinned commit (vendor/pristine/edm)."""

import pytest
import torch

from conftest import EDM, PRISTINE_EDM, assert_same_network, net_dump

# Small versions of each architecture, plus the real CIFAR-10 DDPM++ network of the paper.
CONFIGS = {
    'ddpmpp-cifar10': dict(class_name='training.networks.EDMPrecond', img_resolution=32, img_channels=3, model_type='SongUNet',
        embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
        resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2], augment_dim=9, dropout=0.13),
    'ncsnpp-tiny-cond': dict(class_name='training.networks.VEPrecond', img_resolution=16, img_channels=3, label_dim=10,
        model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
        channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=16, channel_mult=[1,2]),
    'ddpmpp-tiny-vp': dict(class_name='training.networks.VPPrecond', img_resolution=16, img_channels=1,
        model_type='SongUNet', model_channels=16, channel_mult=[1,2]),
    'adm-tiny-cond': dict(class_name='training.networks.iDDPMPrecond', img_resolution=16, img_channels=3, label_dim=10,
        model_type='DhariwalUNet', model_channels=64, channel_mult=[1,2], attn_resolutions=[16,8]),
}
LORA = dict(lora='uc', lora_bases=5, lora_rank=3, lora_mlp=[32,16])


def dump(tree, kwargs, tmp_path, tag, seed=7):
    return net_dump(tree, 'edm_net_dump.py', kwargs, tmp_path / f'{tag}.pt', seed)


@pytest.mark.parametrize('config', CONFIGS)
def test_lora_off_is_bit_identical_to_pristine(config, tmp_path):
    pristine = dump(PRISTINE_EDM, CONFIGS[config], tmp_path, 'pristine')
    # Both spellings of "off": the defaults, and the explicit kwargs train.py records.
    for tag, extra in [('defaults', {}), ('explicit', dict(lora='none', lora_rank=4, lora_bases=18, lora_mlp=[128,64], conv_cond=True))]:
        assert_same_network(dump(EDM, dict(CONFIGS[config], **extra), tmp_path, tag), pristine)


@pytest.mark.parametrize('config', CONFIGS)
def test_uc_lora_at_init_computes_the_baseline(config, tmp_path):
    pristine = dump(PRISTINE_EDM, CONFIGS[config], tmp_path, 'pristine')
    lora = dump(EDM, dict(CONFIGS[config], **LORA), tmp_path, 'lora')

    # Base parameters keep their upstream names and, drawn first, the pristine values for the seed.
    for name, value in pristine['state'].items():
        assert torch.equal(lora['state'][name], value), name
    added = [name for name in lora['names'] if name not in pristine['state']]
    assert added and all('.qkv.lora_' in name or '.proj.lora_' in name for name in added)
    for name in added:
        if name.endswith(('lora_B', 'lora_bias')):
            assert torch.count_nonzero(lora['state'][name]) == 0, name

    for output in ['output', 'output_one_sigma']:
        scale = pristine[output].abs().max()
        assert (lora[output] - pristine[output]).abs().max() <= 1e-5 * scale


def test_only_lora_removes_every_affine_and_nothing_else(tmp_path):
    config = CONFIGS['ddpmpp-tiny-vp']
    baseline = dump(EDM, config, tmp_path, 'baseline')
    only_lora = dump(EDM, dict(config, conv_cond=False, **LORA), tmp_path, 'only-lora')
    removed = set(baseline['names']) - set(only_lora['names'])
    assert removed and all('.affine.' in name for name in removed)
    assert not any('.affine.' in name for name in only_lora['names'])
    assert any('map_layer0' in name for name in only_lora['names']), 'the mapping network feeds UC-LoRA'
    assert torch.isfinite(only_lora['output']).all()


def test_the_bias_term_is_an_option(tmp_path):
    config = CONFIGS['ddpmpp-tiny-vp']
    with_bias = dump(EDM, dict(config, **LORA), tmp_path, 'with-bias')
    without = dump(EDM, dict(config, lora_bias=False, **LORA), tmp_path, 'without-bias')
    dropped = set(with_bias['names']) - set(without['names'])
    assert dropped and all(name.endswith('.lora_bias') for name in dropped)
    assert not set(without['names']) - set(with_bias['names'])
