"""Drop-in: the patched improved-diffusion against a pristine clone at the pinned commit."""

import pytest
import torch

from conftest import IDDPM, PRISTINE_IDDPM, assert_same_network, net_dump

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True, diffusion_steps=4001, noise_schedule='cosine')
CONFIGS = {
    'cifar10-paper': dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3, diffusion_steps=4000, noise_schedule='cosine'),
    'tiny-uncond': TINY,
    'tiny-cond-checkpoint': dict(TINY, class_cond=True, use_checkpoint=True, rescale_timesteps=False, use_scale_shift_norm=False),
}
LORA = dict(time_lora=True, lora_bases=11, lora_rank=4)


def dump(tree, flags, tmp_path, tag, seed=3):
    return net_dump(tree, 'iddpm_net_dump.py', flags, tmp_path / f'{tag}.pt', seed)


@pytest.mark.parametrize('config', CONFIGS)
def test_lora_off_is_bit_identical_to_pristine(config, tmp_path):
    pristine = dump(PRISTINE_IDDPM, CONFIGS[config], tmp_path, 'pristine')
    explicit_off = dict(time_lora=False, class_lora=False, lora_rank=4, lora_bases=11, lora_table_init='interp', conv_cond=True, num_classes=1000)
    for tag, extra in [('defaults', {}), ('explicit', explicit_off)]:
        assert_same_network(dump(IDDPM, dict(CONFIGS[config], **extra), tmp_path, tag), pristine)


@pytest.mark.parametrize('config', ['tiny-uncond', 'tiny-cond-checkpoint'])
def test_time_and_class_lora_at_init_compute_the_baseline(config, tmp_path):
    flags = CONFIGS[config]
    lora = dict(LORA, class_lora=bool(flags.get('class_cond')))
    pristine = dump(PRISTINE_IDDPM, flags, tmp_path, 'pristine')
    patched = dump(IDDPM, dict(flags, **lora), tmp_path, 'lora')
    for name, value in pristine['state'].items(): # same names, same values: LoRA is added last
        assert torch.equal(patched['state'][name], value), name
    added = [name for name in patched['names'] if name not in pristine['state']]
    assert added and all(name.split('.')[-2] in ('qkv', 'proj_out', 'lora_table') for name in added)
    assert all(torch.count_nonzero(patched['state'][name]) == 0 for name in added if name.endswith('lora_B'))
    scale = pristine['output'].abs().max()
    assert (patched['output'] - pristine['output']).abs().max() <= 1e-5 * scale


def test_only_lora_removes_the_embeddings_and_emb_layers(tmp_path):
    flags = dict(TINY, class_cond=True, num_classes=10)
    baseline = dump(IDDPM, flags, tmp_path, 'baseline')
    only_lora = dump(IDDPM, dict(flags, **LORA, class_lora=True, conv_cond=False), tmp_path, 'only-lora')
    removed = set(baseline['names']) - set(only_lora['names'])
    assert removed and all(name.startswith(('time_embed.', 'label_emb.')) or '.emb_layers.' in name for name in removed)
    assert any(name.startswith('time_embed.') for name in removed) and any(name.startswith('label_emb.') for name in removed)
    assert not any('emb_layers' in name or 'time_embed' in name for name in only_lora['names'])
    assert torch.isfinite(only_lora['output']).all()
