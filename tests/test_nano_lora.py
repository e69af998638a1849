"""Nano diffusion with TimeLoRA and UC-LoRA: each mode trains, and starts as the unconditioned base."""

import copy
import sys

import pytest
import torch

from conftest import NANO

sys.path.insert(0, NANO)
import nano_diffusion as nd  # noqa: E402
import nano_lora  # noqa: E402


def build(cond, seed=0, **kwargs):
    torch.manual_seed(seed)
    return nd.MyTinyUNet(cond=cond, **kwargs)


@pytest.mark.parametrize('cond', ['shift', 'timelora', 'uclora'])
def test_each_mode_runs_forward_and_backward_with_both_time_shapes(cond):
    net = build(cond)
    x, t = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 500, 999])
    y = net(x, t)
    assert y.shape == (4, 1, 32, 32) and torch.equal(y, net(x, t[:, None])), 'training passes [N], the sampler [N, 1]'
    y.square().mean().backward()
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    names = [name for name, _ in net.named_parameters()]
    if cond == 'shift':
        assert any(name.startswith('te1.') for name in names) and not any('lora' in name for name in names)
    else:
        assert not any(name.startswith('te') for name in names), 'time-embedding additions removed'
        assert sum('.conv1.lora_A' in name for name in names) == 21, 'every MyConv of the 7 blocks'
        assert any(name.endswith('lora_table.weight') if cond == 'timelora' else '.lora_mlp.' in name for name in names)


@pytest.mark.parametrize('cond', ['timelora', 'uclora'])
def test_lora_at_init_is_the_base_without_conditioning(cond):
    base = build('shift')
    lora = build(cond) # same seed: LoRA is added last, so the shared weights are equal
    unconditioned = copy.deepcopy(base)
    for name in nano_lora.TIME_EMBEDDING_ADDITIONS:
        setattr(unconditioned, name, None)
    lora_state = lora.state_dict()
    for name, value in unconditioned.state_dict().items():
        assert torch.equal(lora_state[name], value), name
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([3, 400, 998])
    with torch.no_grad():
        expected, got = unconditioned(x, t), lora(x, t)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_timelora_table_starts_as_the_interpolation_or_random():
    interp = build('timelora')
    table = interp.b1[0].conv1.lora_table.weight
    assert table.shape == (1000, 10) and torch.equal(table[111 * 4], torch.eye(10)[4]), 'bases at t = 0, 111, ..., 999'
    random = build('timelora', omega_init='random').b1[0].conv1.lora_table.weight
    assert (random < 0).any() and abs(random.std().item() - 1) < 0.05


def test_composition_weights_for_the_heatmaps():
    for cond, bases in [('timelora', 10), ('uclora', 6)]:
        net = build(cond, lora_bases=bases)
        weights = nano_lora.composition_weights(net, torch.arange(0, 1000, 100))
        assert len(weights) == 21 and all(w.shape == (10, bases) for w in weights)


@pytest.mark.parametrize('kwargs,message', [(dict(cond='film'), 'unknown conditioning'), (dict(cond='timelora', omega_init='zeros'), 'unknown omega init')])
def test_bad_modes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nd.MyTinyUNet(**kwargs)
