"""Drop-in: the patched improved-diffusion against a pristine clone at the pinned commit."""

import pytest
import torch

from conftest import IDDPM, PRISTINE_IDDPM, assert_lora_off_is_pristine, lora_added_to, net_dumps
from tiny import IDDPM_TINY

MODEL = dict(IDDPM_TINY, diffusion_steps=4001)
CONFIGS = {
    'cifar10-paper': dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3, diffusion_steps=4000, noise_schedule='cosine'),
    'tiny-uncond': MODEL,
    'tiny-cond-checkpoint': dict(MODEL, class_cond=True, use_checkpoint=True, rescale_timesteps=False, use_scale_shift_norm=False),
}
LORA = dict(time_lora=True, lora_bases=11, lora_rank=4)
# Both spellings of "off": the defaults, and every LoRA flag given at its off value.
OFF = {'defaults': {}, 'explicit': dict(time_lora=False, class_lora=False, lora_rank=4, lora_bases=11, lora_table_init='interp', conv_cond=True, num_classes=1000)}
ONLY_LORA_BASE = dict(MODEL, class_cond=True, num_classes=10)


@pytest.fixture(scope='module')
def dumps(tmp_path_factory):
    """Every model of this module, built once from seed 3: pristine[config], patched[config, tag]."""
    patched = {(config, tag): dict(flags, **extra) for config, flags in CONFIGS.items() for tag, extra in OFF.items()}
    for config in ['tiny-uncond', 'tiny-cond-checkpoint']:
        patched[config, 'lora'] = dict(CONFIGS[config], **LORA, class_lora=bool(CONFIGS[config].get('class_cond')))
    patched['tiny-cond-10', 'defaults'] = ONLY_LORA_BASE
    patched['tiny-cond-10', 'only-lora'] = dict(ONLY_LORA_BASE, **LORA, class_lora=True, conv_cond=False)
    return net_dumps('iddpm_net_dump.py', PRISTINE_IDDPM, CONFIGS, IDDPM, patched, tmp_path_factory.mktemp('iddpm-dumps'), seed=3)


@pytest.mark.parametrize('config', CONFIGS)
def test_lora_off_is_bit_identical_to_pristine(config, dumps):
    assert_lora_off_is_pristine(dumps, config, OFF)


@pytest.mark.parametrize('config', ['tiny-uncond', 'tiny-cond-checkpoint'])
def test_time_and_class_lora_at_init_compute_the_baseline(config, dumps):
    pristine, patched = dumps[0][config], dumps[1][config, 'lora']
    added = lora_added_to(pristine, patched)
    assert added and all(name.split('.')[-2] in ('qkv', 'proj_out', 'lora_table') for name in added)
    assert all(torch.count_nonzero(patched['state'][name]) == 0 for name in added if name.endswith('lora_B'))
    scale = pristine['output'].abs().max()
    assert (patched['output'] - pristine['output']).abs().max() <= 1e-5 * scale


def test_only_lora_removes_the_embeddings_and_emb_layers(dumps):
    baseline, only_lora = dumps[1]['tiny-cond-10', 'defaults'], dumps[1]['tiny-cond-10', 'only-lora']
    removed = set(baseline['names']) - set(only_lora['names'])
    assert removed and all(name.startswith(('time_embed.', 'label_emb.')) or '.emb_layers.' in name for name in removed)
    assert any(name.startswith('time_embed.') for name in removed) and any(name.startswith('label_emb.') for name in removed)
    assert not any('emb_layers' in name or 'time_embed' in name for name in only_lora['names'])
    assert torch.isfinite(only_lora['output']).all()
