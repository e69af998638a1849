"""Nano diffusion with TimeLoRA and UC-LoRA: each mode trains, and starts as the unconditioned base."""

import copy
import math
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


def vaswani_embedding(t, d):
    """Row t of the sinusoidal embedding of "Attention is all you need": column 2i is sin(t w_i), column 2i+1 is
    cos(t w_i), w_i = 10000^(-2i/d); float64, one column at a time."""
    row = []
    for i in range(d // 2):
        w = 10000 ** (-2 * i / d)
        row += [math.sin(t * w), math.cos(t * w)]
    return torch.tensor(row, dtype=torch.float64)


def notebook_shift_by_hand(net, x, t):
    """x + te1(embedding of t), the notebook's input to the first block, from the definitions rather than from the
    network's modules: the embedding above (time_emb_dim 100), then te1's weights applied as the notebook's _make_te
    MLP (Linear, SiLU, Linear), one sample at a time in float64."""
    first, _, second = net.te1
    shifts = []
    for step in t.tolist():
        hidden = first.weight.double() @ vaswani_embedding(step, 100) + first.bias.double()
        hidden = hidden / (1 + torch.exp(-hidden)) # SiLU
        shifts.append(second.weight.double() @ hidden + second.bias.double())
    return x.double() + torch.stack(shifts).reshape(len(x), -1, 1, 1) # one shift a sample, over every pixel


@pytest.mark.parametrize('cond', ['shift', 'timelora', 'uclora'])
def test_the_first_block_reads_the_input_itself_unless_the_notebook_shifts_it(cond):
    # Where LoRA conditions, the removed time-embedding additions cost nothing: no pass over the activations.
    net, seen = build(cond), []
    net.b1[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        net(x, t)
        if cond == 'shift':
            expected = notebook_shift_by_hand(net, x, t)
            assert (seen[0].double() - expected).abs().max() <= 1e-5 * expected.abs().max()
        else:
            assert seen[0] is x


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


@pytest.mark.parametrize('cond', ['shift', 'timelora', 'uclora'])
def test_the_unet_cannot_see_the_mean_or_contrast_of_its_input(cond):
    # The whole-image LayerNorm of the first MyConv removes both (in 'shift' the te1 addition too,
    # a per-image constant). This is why samples drift in mean (see the next test and nano_metrics.mean_drift).
    net = build(cond).eval()
    x, t = torch.randn(4, 1, 32, 32), torch.tensor([3, 200, 600, 990])
    with torch.no_grad():
        y = net(x, t)
        for scale, offset in [(1.0, 0.7), (2.5, -0.3), (0.4, 5.0)]:
            torch.testing.assert_close(net(scale * x + offset, t), y, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(net(x + torch.linspace(0, 1, 32), t), y, atol=1e-3), 'a non-constant change is seen'


def test_the_sampler_multiplies_a_mean_offset_by_one_over_sqrt_alpha_bar():
    # Two sampler runs that differ only by a constant added to x_T end differing by that constant
    # times prod(1 / sqrt(alpha_t)) over the 1000 steps: nothing pulls the mean back.
    torch.manual_seed(0)
    model = nd.DDPM(build('uclora'), 1000, device=torch.device('cpu'))
    model.network.eval()
    x = torch.randn(2, 1, 32, 32)
    runs = []
    for offset in [0.0, 0.01]:
        torch.manual_seed(1) # the same sampling noise
        sample = x + offset
        with torch.no_grad():
            for t in range(999, 899, -1): # the first 100 steps (the growth is 2.6x there)
                time_tensor = torch.full((2, 1), t)
                sample = model.step(model.reverse(sample, time_tensor), time_tensor[0], sample)
        runs.append(sample)
    growth = 1 / model.alphas[900:].prod().sqrt()
    torch.testing.assert_close(runs[1] - runs[0], torch.full_like(x, 0.01 * float(growth)), atol=1e-4, rtol=1e-3)
    assert float(1 / model.alphas_cumprod[-1].sqrt()) > 150, 'over all 1000 steps the offset grows about 157x'
