"""Drop-in: the patched EDM against a pristine clone at the pinned commit (vendor/pristine/edm)."""

import pytest
import torch

from conftest import EDM, PRISTINE_EDM, assert_lora_off_is_pristine, lora_added_to, net_dumps
from tiny import EDM_ADM, EDM_DDPMPP, EDM_NCSNPP

pytestmark = pytest.mark.first(45) # one of the longest modules, started early (seconds measured by --durations)

# Small versions of each architecture, plus the real CIFAR-10 DDPM++ network of the paper.
CONFIGS = {
    'ddpmpp-cifar10': dict(class_name='training.networks.EDMPrecond', img_resolution=32, img_channels=3, model_type='SongUNet',
        embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
        resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2], augment_dim=9, dropout=0.13),
    'ncsnpp-tiny-cond': dict(EDM_NCSNPP, class_name='training.networks.VEPrecond'),
    'ddpmpp-tiny-vp': dict(EDM_DDPMPP, class_name='training.networks.VPPrecond', img_channels=1, label_dim=0),
    'adm-tiny-cond': dict(EDM_ADM, class_name='training.networks.iDDPMPrecond'),
}
LORA = dict(lora='uc', lora_bases=5, lora_rank=3, lora_mlp=[32,16])
# Both spellings of "off": the defaults, and the explicit kwargs train.py records.
OFF = {'defaults': {}, 'explicit': dict(lora='none', lora_rank=4, lora_bases=18, lora_mlp=[128,64], lora_bias=True, lora_scale='fixed', adaln=False, conv_cond=True)}
SMALL = 'ddpmpp-tiny-vp'
SMALL_VARIANTS = {'only-lora': dict(conv_cond=False, **LORA), 'without-bias': dict(lora_bias=False, **LORA),
                  'trainable-scale': dict(lora_scale='trainable', **LORA)}


@pytest.fixture(scope='module')
def dumps(tmp_path_factory):
    """Every network of this module, built once from seed 7: pristine[config], patched[config, tag]."""
    patched = {(config, tag): dict(kwargs, **extra) for config, kwargs in CONFIGS.items() for tag, extra in dict(OFF, lora=LORA).items()}
    patched.update({(SMALL, tag): dict(CONFIGS[SMALL], **extra) for tag, extra in SMALL_VARIANTS.items()})
    return net_dumps('edm_net_dump.py', PRISTINE_EDM, CONFIGS, EDM, patched, tmp_path_factory.mktemp('edm-dumps'), seed=7)


@pytest.mark.parametrize('config', CONFIGS)
def test_lora_off_is_bit_identical_to_pristine(config, dumps):
    assert_lora_off_is_pristine(dumps, config, OFF)


@pytest.mark.parametrize('config', CONFIGS)
def test_uc_lora_at_init_computes_the_baseline(config, dumps):
    pristine, lora = dumps[0][config], dumps[1][config, 'lora']

    added = lora_added_to(pristine, lora) # base parameters keep their upstream names and pristine values
    assert added and all('.qkv.lora_' in name or '.proj.lora_' in name for name in added)
    for name in added:
        if name.endswith(('lora_B', 'lora_bias')):
            assert torch.count_nonzero(lora['state'][name]) == 0, name

    for output in ['output', 'output_one_sigma']:
        scale = pristine[output].abs().max()
        assert (lora[output] - pristine[output]).abs().max() <= 1e-5 * scale


def test_only_lora_removes_every_affine_and_nothing_else(dumps):
    baseline, only_lora = dumps[1][SMALL, 'defaults'], dumps[1][SMALL, 'only-lora']
    removed = set(baseline['names']) - set(only_lora['names'])
    assert removed and all('.affine.' in name for name in removed)
    assert not any('.affine.' in name for name in only_lora['names'])
    assert any('map_layer0' in name for name in only_lora['names']), 'the mapping network feeds UC-LoRA'
    assert torch.isfinite(only_lora['output']).all()


def test_the_bias_term_is_an_option(dumps):
    with_bias, without = dumps[1][SMALL, 'lora'], dumps[1][SMALL, 'without-bias']
    dropped = set(with_bias['names']) - set(without['names'])
    assert dropped and all(name.endswith('.lora_bias') for name in dropped)
    assert not set(without['names']) - set(with_bias['names'])


def test_a_trainable_scale_is_one_scalar_an_adapted_layer_and_starts_as_the_baseline(dumps):
    fixed, scaled = dumps[1][SMALL, 'lora'], dumps[1][SMALL, 'trainable-scale']
    added = set(scaled['names']) - set(fixed['names'])
    assert added and all(name.endswith(('.qkv.lora_scale', '.proj.lora_scale')) for name in added)
    assert len(added) == sum(name.endswith('.qkv.lora_A') for name in fixed['names']) * 2
    assert all(scaled['state'][name].item() == 1.0 for name in added)
    assert torch.equal(scaled['output'], fixed['output'])
