"""The shared LoRA core, overlay/common/lora.py, on its own (pure PyTorch)."""

import importlib.util
import os

import pytest
import torch

from conftest import ROOT

spec = importlib.util.spec_from_file_location('lora_core', os.path.join(ROOT, 'overlay', 'common', 'lora.py'))
lora = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lora)


def reference(layer, x, weights):
    """The paper's formula, one basis at a time: W x + b + sum_i w_i (B_i A_i x + E_i)."""
    conv = torch.nn.functional.conv2d if x.ndim == 4 else torch.nn.functional.conv1d
    spatial = [1] * (x.ndim - 2)
    y = conv(x, layer.weight, layer.bias, padding=layer.padding)
    r = layer.rank
    for i in range(layer.bases):
        A_i = layer.lora_A[i * r:(i + 1) * r]
        B_i = layer.lora_B[:, i * r:(i + 1) * r]
        delta = conv(conv(x, A_i, padding=layer.padding), B_i.reshape(*B_i.shape, *spatial))
        if layer.lora_bias is not None:
            delta = delta + layer.lora_bias[i * r:(i + 1) * r].sum(0).reshape(1, -1, *spatial)
        y = y + weights[:, i].reshape(-1, 1, *spatial) * delta
    return y


def make_layer(num_dims, kernel, bases=4, rank=3, lora_bias=True, trained=True):
    layer = lora.ComposedLoRAConv(in_channels=6, out_channels=10, kernel=kernel, num_dims=num_dims, bases=bases, rank=rank, lora_bias=lora_bias)
    base = (torch.nn.Conv2d if num_dims == 2 else torch.nn.Conv1d)(6, 10, kernel, padding=kernel // 2)
    layer.adopt_base(base)
    if trained: # away from the zero init, so that every term counts
        with torch.no_grad():
            layer.lora_B.normal_()
            if layer.lora_bias is not None:
                layer.lora_bias.normal_()
    return layer, base


@pytest.mark.parametrize('num_dims,kernel,lora_bias', [(2, 1, True), (2, 3, True), (1, 1, True), (1, 1, False), (2, 3, False)])
def test_composed_layer_matches_the_formula(num_dims, kernel, lora_bias):
    torch.manual_seed(0)
    layer, _ = make_layer(num_dims, kernel, lora_bias=lora_bias)
    x = torch.randn(5, 6, *[7] * num_dims)
    weights = torch.randn(5, 4)
    expected = reference(layer, x, weights)
    got = layer(x, weights)
    assert got.shape == (5, 10, *[7] * num_dims)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_one_row_of_weights_serves_the_whole_batch():
    torch.manual_seed(4)
    layer, _ = make_layer(2, 1)
    x = torch.randn(5, 6, 4, 4)
    weights = torch.randn(1, 4)
    assert torch.allclose(layer(x, weights), layer(x, weights.expand(5, 4)), rtol=0, atol=1e-6)


def test_output_is_linear_in_the_composition_weights():
    torch.manual_seed(1)
    layer, base = make_layer(2, 3)
    x = torch.randn(2, 6, 5, 5)
    w1, w2 = torch.randn(2, 4), torch.randn(2, 4)
    delta = lambda w: layer(x, w) - base(x)
    combined = delta(0.3 * w1 - 1.7 * w2)
    assert (combined - (0.3 * delta(w1) - 1.7 * delta(w2))).abs().max() <= 1e-5 * combined.abs().max()


@pytest.mark.parametrize('num_dims,kernel', [(2, 1), (2, 3), (1, 1)])
def test_zero_init_is_exactly_the_base_layer(num_dims, kernel):
    torch.manual_seed(2)
    layer, base = make_layer(num_dims, kernel, trained=False)
    x = torch.randn(3, 6, *[6] * num_dims)
    assert torch.allclose(layer(x, torch.randn(3, 4)), base(x), rtol=0, atol=1e-6)


def test_adopted_parameters_are_the_base_objects_under_their_own_names():
    layer, base = make_layer(2, 1)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert list(layer.state_dict()) == ['weight', 'bias', 'lora_A', 'lora_B', 'lora_bias']
    with pytest.raises(ValueError, match='does not match'):
        layer.adopt_base(torch.nn.Conv2d(6, 11, 1))


def test_init_follows_the_authors_release():
    torch.manual_seed(3)
    layer = lora.ComposedLoRAConv(in_channels=256, out_channels=768, kernel=1, num_dims=2, bases=18, rank=4)
    assert layer.lora_A.shape == (72, 256, 1, 1) and layer.lora_B.shape == (768, 72) and layer.lora_bias.shape == (72, 768)
    assert abs(layer.lora_A.std().item() - 1 / 4) < 0.01 and abs(layer.lora_A.mean().item()) < 0.01
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_bias) == 0


def test_uc_lora_parameter_count_and_mlp_layout():
    layer = lora.UCLoRAConv(in_channels=256, out_channels=768, kernel=1, num_dims=2, bases=18, rank=4, emb_channels=512, mlp_widths=[128, 64])
    layer.adopt_base(torch.nn.Conv2d(256, 768, 1))
    norms = [m for m in layer.lora_mlp.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [n.num_groups for n in norms] == [32, 16], 'EDM GroupNorm grouping'
    mlp = (512 * 128 + 128) + 2 * 128 + (128 * 64 + 64) + 2 * 64 + (64 * 18 + 18)
    lora_terms = 72 * 256 + 768 * 72 + 72 * 768
    base = 768 * 256 + 768
    assert sum(p.numel() for p in layer.parameters()) == base + mlp + lora_terms
    emb = torch.randn(4, 512)
    weights = layer.lora_mlp(emb)
    assert weights.shape == (4, 18)
    x = torch.randn(4, 256, 3, 3)
    assert torch.allclose(layer(x, emb), lora.ComposedLoRAConv.forward(layer, x, weights))


@pytest.mark.parametrize('kwargs', [dict(bases=0, rank=4), dict(bases=4, rank=0)])
def test_bad_sizes_are_refused(kwargs):
    with pytest.raises(ValueError):
        lora.ComposedLoRAConv(in_channels=4, out_channels=4, kernel=1, num_dims=2, **kwargs)


@pytest.mark.parametrize('widths', [[], [0, 4], [-2]])
def test_bad_mlp_widths_are_refused(widths):
    with pytest.raises(ValueError):
        lora.CompositionMLP(in_features=8, hidden_widths=widths, out_features=3)


def test_low_precision_activations_keep_their_dtype():
    # EDM's --fp16 runs the U-Net in half precision with fp32 parameters; bfloat16 stands in on the CPU.
    torch.manual_seed(5)
    layer = lora.UCLoRAConv(in_channels=8, out_channels=24, kernel=1, num_dims=2, bases=3, rank=2, emb_channels=16, mlp_widths=[8])
    layer.adopt_base(torch.nn.Conv2d(8, 24, 1))
    with torch.no_grad():
        layer.lora_B.normal_()
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    low = layer(x.to(torch.bfloat16), emb)
    assert low.dtype == torch.bfloat16
    full = layer(x, emb)
    assert (low.float() - full).abs().max() <= 0.05 * full.abs().max()


@pytest.mark.parametrize('num_dims,kernel,num_classes', [(1, 1, 0), (1, 1, 3), (2, 3, 2)])
def test_non_compositional_time_lora_uses_each_samples_own_step(num_dims, kernel, num_classes):
    torch.manual_seed(6)
    layer = lora.TimeClassLoRAConv(in_channels=6, out_channels=10, kernel=kernel, num_dims=num_dims, rank=2, time_steps=7,
                                   time_bases=3, num_classes=num_classes, compositional=False)
    base = (torch.nn.Conv2d if num_dims == 2 else torch.nn.Conv1d)(6, 10, kernel, padding=kernel // 2)
    layer.adopt_base(base)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.lora_table is None and layer.lora_A.shape[0] == (7 + num_classes) * 2, 'one basis per step, no table'
    x, t = torch.randn(4, 6, *[5] * num_dims), torch.tensor([0, 6, 3, 3])
    c = torch.randn(4, num_classes) if num_classes else None
    # Reference: the composed formula with one-hot step weights, which weighs all 7 step LoRAs.
    one_hot = torch.nn.functional.one_hot(t, 7).float()
    expected = lora.ComposedLoRAConv.forward(layer, x, torch.cat([one_hot] + ([c] if num_classes else []), dim=1))
    got = layer(x, t, c)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
