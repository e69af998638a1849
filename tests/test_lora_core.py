"""The shared LoRA core, overlay/common/lora.py, on its own (pure PyTorch)."""

import importlib.util
import os
import sys

import pytest
import torch

from conftest import CUDA_ONLY, ROOT

# Loaded from overlay/ under its own name, as the pure-PyTorch module IDDPM and nano diffusion get (where EDM's
# torch_utils is absent, its classes are plain torch modules); registered, as an import would be.
spec = importlib.util.spec_from_file_location('lora_core', os.path.join(ROOT, 'overlay', 'common', 'lora.py'))
lora = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = lora
spec.loader.exec_module(lora)
assert 'torch_utils' not in sys.modules, 'no test module puts EDM on the path while tests are collected'


@pytest.fixture(params=['cpu', pytest.param('cuda', marks=CUDA_ONLY)])
def device(request):
    """Where an equivalence test runs: the CPU, and a CUDA GPU where there is one (cuDNN's and cuBLAS's own kernels), there
    in true float32: torch lets convolutions use TF32 by default, whose 10-bit mantissa the 1e-5 tolerance would not pass."""
    if request.param == 'cpu':
        yield 'cpu'
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield 'cuda'
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def reference(layer, x, omega):
    """The paper's formula, one basis at a time: W x + b + s * sum_i omega_i (B_i A_i x + E_i), for a convolution
    (x [N, C_in, *spatial]) or a Linear (weight [C_out, C_in], x [N, ..., C_in], channels last)."""
    r, ones = layer.rank, [1] * (x.ndim - 2)
    s = 1 if layer.lora_scale is None else layer.lora_scale
    if layer.weight.ndim == 2: # a Linear: each map a matrix product on the last dimension
        y = x @ layer.weight.T + (0 if layer.bias is None else layer.bias)
        for i in range(layer.bases):
            A_i, B_i = layer.lora_A[i * r:(i + 1) * r], layer.lora_B[:, i * r:(i + 1) * r]
            delta = x @ A_i.T @ B_i.T
            if layer.lora_bias is not None:
                delta = delta + layer.lora_bias[i * r:(i + 1) * r].sum(0)
            y = y + s * omega[:, i].reshape(-1, *ones, 1) * delta
        return y
    conv = torch.nn.functional.conv2d if x.ndim == 4 else torch.nn.functional.conv1d
    padding = layer.weight.shape[-1] // 2
    y = conv(x, layer.weight, layer.bias, padding=padding)
    for i in range(layer.bases):
        A_i = layer.lora_A[i * r:(i + 1) * r]
        B_i = layer.lora_B[:, i * r:(i + 1) * r]
        delta = conv(conv(x, A_i, padding=padding), B_i.reshape(*B_i.shape, *ones))
        if layer.lora_bias is not None:
            delta = delta + layer.lora_bias[i * r:(i + 1) * r].sum(0).reshape(1, -1, *ones)
        y = y + s * omega[:, i].reshape(-1, 1, *ones) * delta
    return y


def activations(num_dims, batch, channels, size):
    """A random input of a layer: [batch, channels, *size] for a convolution, [batch, size, channels] (tokens) for a Linear."""
    return torch.randn(batch, size, channels) if num_dims == 0 else torch.randn(batch, channels, *[size] * num_dims)


def make_base(num_dims, kernel, in_channels=6, out_channels=10, bias=True):
    if num_dims == 0:
        return torch.nn.Linear(in_channels, out_channels, bias=bias)
    return (torch.nn.Conv2d if num_dims == 2 else torch.nn.Conv1d)(in_channels, out_channels, kernel, padding=kernel // 2, bias=bias)


def make_layer(num_dims, kernel, bases=4, rank=3, lora_bias=True, trained=True):
    base = make_base(num_dims, kernel)
    layer = lora.ComposedLoRAConv.from_base(base, bases=bases, rank=rank, lora_bias=lora_bias)
    if trained: # away from the zero init, so that every term counts
        with torch.no_grad():
            layer.lora_B.normal_()
            if layer.lora_bias is not None:
                layer.lora_bias.normal_()
    return layer, base


@pytest.mark.parametrize('num_dims,kernel,lora_bias', [(2, 1, True), (2, 3, True), (1, 1, True), (1, 1, False), (2, 3, False), (0, 1, True), (0, 1, False)])
def test_composed_layer_matches_the_formula(num_dims, kernel, lora_bias):
    torch.manual_seed(0)
    layer, _ = make_layer(num_dims, kernel, lora_bias=lora_bias)
    x = activations(num_dims, 5, 6, 7)
    omega = torch.randn(5, 4)
    expected = reference(layer, x, omega)
    got = layer(x, omega)
    assert got.shape == ((5, 7, 10) if num_dims == 0 else (5, 10, *[7] * num_dims))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def random_layer(num_dims, kernel, base_bias, lora_bias, trainable_scale, in_channels=6):
    """A layer with every parameter drawn from N(0, 1), so that every term of the formula counts."""
    layer = lora.ComposedLoRAConv(in_channels=in_channels, out_channels=10, kernel=kernel, num_dims=num_dims, bases=4, rank=3,
                                  base_bias=base_bias, lora_bias=lora_bias, trainable_scale=trainable_scale)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_()
    return layer


def assert_same_outputs_and_gradients(computations, inputs, output_grad):
    """Each computation's output and the gradients of `inputs` equal the last computation's (1e-5 x max |.|)."""
    results = []
    for compute in computations:
        output = compute()
        results.append([output, *torch.autograd.grad((output * output_grad).sum(), inputs)])
    for result in results[:-1]:
        for got, expected in zip(result, results[-1]): # the output, then the gradient of each input
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize('num_dims,kernel,base_bias,lora_bias,trainable_scale', [
    (2, 3, True, True, False), (2, 1, False, True, True), (1, 1, True, False, True), (2, 3, True, False, False),
    (0, 1, True, True, False), (0, 1, False, True, True)])
def test_one_condition_for_the_batch_takes_the_merged_path_with_the_same_function(num_dims, kernel, base_bias, lora_bias, trainable_scale, device):
    # omega [1, m] (a sampler's one noise level or step): merged into the base weight; omega [N, m]: a per-sample path.
    torch.manual_seed(7)
    layer = random_layer(num_dims, kernel, base_bias, lora_bias, trainable_scale).to(device)
    x = activations(num_dims, 5, 6, 7).to(device).requires_grad_()
    omega = torch.randn(1, 4).to(device).requires_grad_()
    output_grad = torch.randn(layer.base_forward(x).shape).to(device)
    assert_same_outputs_and_gradients([lambda: layer(x, omega), lambda: reference(layer, x, omega.expand(5, 4))],
                                      [x, omega, *layer.parameters()], output_grad)


PATHS = ['per_sample_merged_forward', 'low_rank_forward', 'reference_forward', 'forward']


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('num_dims,kernel,base_bias,lora_bias,trainable_scale', [
    (2, 3, True, True, False), (2, 1, False, True, True), (1, 1, True, False, True), (2, 3, True, False, True), (1, 3, False, False, False),
    (0, 1, True, True, False), (0, 1, False, True, True), (0, 1, True, False, True)])
def test_every_per_sample_path_is_the_formula_forward_and_backward(path, num_dims, kernel, base_bias, lora_bias, trainable_scale, device):
    # Each sample its own omega (training): every way the layer can compute it is the paper's formula, in its output
    # and in the gradient of the input, of omega and of every parameter.
    torch.manual_seed(16)
    layer = random_layer(num_dims, kernel, base_bias, lora_bias, trainable_scale).to(device)
    x = activations(num_dims, 5, 6, 7).to(device).requires_grad_()
    omega = torch.randn(5, 4).to(device).requires_grad_()
    output_grad = torch.randn(layer.base_forward(x).shape).to(device)
    assert_same_outputs_and_gradients([lambda: getattr(layer, path)(x, omega), lambda: reference(layer, x, omega)],
                                      [x, omega, *layer.parameters()], output_grad)


@pytest.mark.parametrize('batch,in_channels,size', [
    (25, 6, 12), # more rows than one panel of the layout's transposes, both ways (25 x 6 = 150 and 12 x 12 = 144 > 128)
    (5, 1, 7)])  # one input channel: the grouped convolution in the plain layout
def test_per_sample_merged_path_is_the_formula_across_panels_and_for_one_input_channel(batch, in_channels, size, device):
    torch.manual_seed(12)
    layer = random_layer(2, 3, True, True, False, in_channels=in_channels).to(device)
    x = torch.randn(batch, in_channels, size, size).to(device).requires_grad_()
    omega = torch.randn(batch, 4).to(device).requires_grad_()
    assert_same_outputs_and_gradients([lambda: layer.per_sample_merged_forward(x, omega), lambda: reference(layer, x, omega)],
                                      [x, omega, *layer.parameters()], torch.randn(batch, 10, size, size).to(device))


@pytest.mark.parametrize('path', ['merged_forward', *PATHS])
@pytest.mark.parametrize('tokens', [[], [2, 3]])
def test_a_linear_layer_takes_any_token_dimensions(path, tokens):
    # A Linear's input [N, ..., C_in]: no token dimension (one vector a sample) or several (a grid of tokens).
    torch.manual_seed(14)
    layer = random_layer(0, 1, True, True, True)
    x = torch.randn(5, *tokens, 6, requires_grad=True)
    omega = torch.randn(1 if path == 'merged_forward' else 5, 4, requires_grad=True)
    assert_same_outputs_and_gradients([lambda: getattr(layer, path)(x, omega), lambda: reference(layer, x, omega)],
                                      [x, omega, *layer.parameters()], torch.randn(5, *tokens, 10))


def test_the_grouped_layout_holds_the_batchs_values_in_channels_last_order():
    x = torch.randn(25, 6, 12, 12)
    grouped = lora.batch_to_groups(x)
    assert grouped.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(grouped, x.reshape(1, 150, 12, 12))
    assert torch.equal(lora.groups_to_batch(grouped, 25), x) and lora.groups_to_batch(grouped, 25).is_contiguous()


@pytest.mark.parametrize('channels,size,kernel,merges', [
    ((10, 10), 32, 3, True), ((20, 10), 16, 3, True),     # nano diffusion's large layers: one merged kernel a sample
    ((40, 40), 8, 3, False), ((40, 20), 8, 3, False),     # nano diffusion's small layers: the low-rank path
    ((20, 40), 8, 3, False), ((40, 20), 4, 3, False),
    ((256, 768), 16, 1, False), ((256, 256), 8, 1, False)]) # EDM's and IDDPM's attention qkv and proj
def test_the_path_is_chosen_by_cost(channels, size, kernel, merges):
    layer = lora.ComposedLoRAConv(in_channels=channels[0], out_channels=channels[1], kernel=kernel, num_dims=2, bases=10, rank=4)
    assert layer.per_sample_merge_pays(torch.zeros(1, channels[0], size, size)) == merges


@pytest.mark.parametrize('channels,tokens,merges', [
    ((64, 64), 256, True), ((32, 32), 64, True), ((16, 16), 256, True),   # many tokens, few channels: merged matrices
    ((64, 64), 16, False), ((128, 128), 64, False)])                      # few tokens, many channels: the low-rank path
def test_the_linear_path_is_chosen_by_cost(channels, tokens, merges):
    # Shapes timed in results/bench/notes.md (10 bases of rank 4).
    layer = lora.ComposedLoRAConv(in_channels=channels[0], out_channels=channels[1], kernel=1, num_dims=0, bases=10, rank=4)
    assert layer.per_sample_merge_pays(torch.zeros(1, tokens, channels[0])) == merges


@pytest.mark.parametrize('widths', [[16, 8], [12], [64, 32]])
def test_omega_computed_together_is_each_layers_own_forward_and_backward(widths, device):
    torch.manual_seed(12)
    layers = [lora.UCLoRAConv(in_channels=4, out_channels=6, kernel=3, num_dims=2, bases=5, rank=2, emb_channels=20, mlp_widths=widths).to(device)
              for _ in range(4)]
    parameters = [p for layer in layers for p in layer.lora_mlp.parameters()]
    with torch.no_grad():
        for p in parameters: # GroupNorm's affine away from 1 and 0, so that it counts
            p.add_(0.3 * torch.randn_like(p))
        for layer in layers: # the LoRA terms away from their zero init, so that which omega a layer takes counts
            layer.lora_B.normal_()
            layer.lora_bias.normal_()
    emb = torch.randn(7, 20).to(device).requires_grad_()
    output_grads = [torch.randn(7, 5).to(device) for _ in layers]
    together = lora.omega_together(layers, emb)
    alone = {layer: layer.lora_mlp(emb) for layer in layers}
    results = []
    for composition in [together, alone]:
        outputs = [composition[layer] for layer in layers]
        loss = sum((output * g).sum() for output, g in zip(outputs, output_grads))
        results.append(outputs + list(torch.autograd.grad(loss, [emb, *parameters])))
    for got, expected in zip(*results): # each layer's omega, then the gradient of emb and of every MLP parameter
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    x = torch.randn(7, 4, 5, 5).to(device)
    for layer in layers: # a layer handed everyone's omega takes its own
        expected = reference(layer, x, together[layer])
        assert (layer(x, together) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_omega_of_differently_shaped_mlps_is_computed_one_by_one():
    torch.manual_seed(13)
    layers = [lora.UCLoRAConv(in_channels=4, out_channels=6, kernel=1, num_dims=2, bases=bases, rank=2, emb_channels=20, mlp_widths=[8])
              for bases in [3, 5]]
    emb = torch.randn(2, 20)
    together = lora.omega_together(layers, emb)
    for layer in layers:
        assert torch.equal(together[layer], layer.lora_mlp(emb))


def test_output_is_linear_in_omega():
    torch.manual_seed(1)
    layer, base = make_layer(2, 3)
    x = torch.randn(2, 6, 5, 5)
    w1, w2 = torch.randn(2, 4), torch.randn(2, 4)
    delta = lambda w: layer(x, w) - base(x)
    combined = delta(0.3 * w1 - 1.7 * w2)
    assert (combined - (0.3 * delta(w1) - 1.7 * delta(w2))).abs().max() <= 1e-5 * combined.abs().max()


def test_a_trainable_scale_multiplies_the_whole_update_and_learns():
    torch.manual_seed(2)
    fixed, base = make_layer(2, 3)
    scaled = lora.ComposedLoRAConv.from_base(base, bases=4, rank=3, trainable_scale=True)
    scaled.load_state_dict(fixed.state_dict(), strict=False)
    assert fixed.lora_scale is None and scaled.lora_scale.shape == () and scaled.lora_scale.item() == 1.0
    assert [name for name, _ in scaled.named_parameters()][-1] == 'lora_scale', 'one scalar, after the LoRA terms'
    x, omega = torch.randn(3, 6, 5, 5), torch.randn(3, 4)
    assert torch.equal(scaled(x, omega), fixed(x, omega)), 'initialised to 1: the fixed layer'
    with torch.no_grad():
        scaled.lora_scale.fill_(-0.4)
    expected = base(x) - 0.4 * (fixed(x, omega) - base(x))
    assert (scaled(x, omega) - expected).abs().max() <= 1e-5 * expected.abs().max()
    scaled(x, omega).square().sum().backward()
    assert scaled.lora_scale.grad is not None and scaled.lora_scale.grad != 0


@pytest.mark.parametrize('num_dims,kernel', [(2, 1), (2, 3), (1, 1), (0, 1)])
def test_zero_init_is_exactly_the_base_layer(num_dims, kernel):
    torch.manual_seed(2)
    layer, base = make_layer(num_dims, kernel, trained=False)
    x = activations(num_dims, 3, 6, 6)
    assert torch.allclose(layer(x, torch.randn(3, 4)), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize('num_dims,kernel', [(2, 3), (1, 1), (0, 1)])
def test_adopted_parameters_are_the_base_objects_under_their_own_names(num_dims, kernel):
    layer, base = make_layer(num_dims, kernel)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert list(layer.state_dict()) == ['weight', 'bias', 'lora_A', 'lora_B', 'lora_bias']
    assert layer.lora_A.shape == (12, 6, *[kernel] * num_dims) and layer.lora_B.shape == (10, 12) and layer.lora_bias.shape == (12, 10)
    with pytest.raises(ValueError, match='does not match'):
        layer.adopt_base(make_base(num_dims, kernel, out_channels=11))


FROM_BASE = {
    'uc':    (lambda: lora.UCLoRAConv, dict(bases=3, rank=2, emb_channels=8, mlp_widths=[8], trainable_scale=True)),
    'class': (lambda: lora.ClassLoRAConv, dict(num_classes=5, rank=2)),
    'time':  (lambda: lora.TimeClassLoRAConv, dict(rank=2, time_steps=9, time_bases=3, num_classes=2, table_init='random')),
}


@pytest.mark.parametrize('method', list(FROM_BASE))
@pytest.mark.parametrize('num_dims,kernel,bias', [(2, 3, True), (1, 1, False), (0, 1, True)])
def test_from_base_reads_the_shapes_and_draws_what_building_then_adopting_draws(method, num_dims, kernel, bias):
    # The one-step constructor is the two steps it replaces: the same parameters, values and random draws
    # (adoption's own check draws from a generator of its own).
    cls, options = FROM_BASE[method][0](), FROM_BASE[method][1]
    base = make_base(num_dims, kernel, bias=bias)
    torch.manual_seed(15)
    layer = cls.from_base(base, **options)
    after_one_step = torch.randn(3)
    torch.manual_seed(15)
    two_steps = cls(in_channels=6, out_channels=10, kernel=kernel, num_dims=num_dims, base_bias=bias, **options)
    after_building = torch.get_rng_state()
    two_steps.adopt_base(base)
    assert torch.equal(torch.get_rng_state(), after_building), 'adoption draws no global random numbers'
    assert torch.equal(torch.randn(3), after_one_step)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert list(layer.state_dict()) == list(two_steps.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), two_steps.state_dict().values()))


def test_adoption_checks_a_base_built_on_the_meta_device():
    # EDM's train.py builds the network once on the meta device (shapes only) to check its options.
    with torch.device('meta'):
        layer = lora.UCLoRAConv.from_base(torch.nn.Conv2d(6, 10, 3, padding=1), bases=3, rank=2, emb_channels=8, mlp_widths=[8])
        assert layer.weight.is_meta and layer.lora_A.is_meta
        with pytest.raises(ValueError, match='NormalisedConv2d computes something other than'):
            lora.UCLoRAConv.from_base(NormalisedConv2d(6, 10, 3, padding=1), bases=3, rank=2, emb_channels=8, mlp_widths=[8])


def test_init_follows_the_authors_release():
    torch.manual_seed(3)
    layer = lora.ComposedLoRAConv(in_channels=256, out_channels=768, kernel=1, num_dims=2, bases=18, rank=4)
    assert layer.lora_A.shape == (72, 256, 1, 1) and layer.lora_B.shape == (768, 72) and layer.lora_bias.shape == (72, 768)
    assert abs(layer.lora_A.std().item() - 1 / 4) < 0.01 and abs(layer.lora_A.mean().item()) < 0.01
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_bias) == 0


def test_uc_lora_parameter_count_and_mlp_layout():
    torch.manual_seed(4)
    layer = lora.UCLoRAConv.from_base(torch.nn.Conv2d(256, 768, 1), bases=18, rank=4, emb_channels=512, mlp_widths=[128, 64])
    norms = [m for m in layer.lora_mlp.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [n.num_groups for n in norms] == [32, 16], 'EDM GroupNorm grouping'
    mlp = (512 * 128 + 128) + 2 * 128 + (128 * 64 + 64) + 2 * 64 + (64 * 18 + 18)
    lora_terms = 72 * 256 + 768 * 72 + 72 * 768
    base = 768 * 256 + 768
    assert sum(p.numel() for p in layer.parameters()) == base + mlp + lora_terms
    with torch.no_grad(): # every term away from its init (B, E, the MLP's zero biases, GroupNorm's unit affine), so that it counts
        for name, p in layer.named_parameters():
            if name.startswith('lora_mlp') or name in ['lora_B', 'lora_bias']:
                p.normal_(std=0.3)
    emb, x = torch.randn(4, 512), torch.randn(4, 256, 3, 3)
    # The paper's UC-LoRA written out: omega = MLP(emb) (Linear, GroupNorm, SiLU for each hidden width, then Linear),
    # y = W x + b + sum_i omega_i (B_i A_i x + E_i), where 1x1 kernels make every map a matrix product a pixel.
    p = dict(layer.named_parameters())
    h = emb
    for i, groups in [(0, 32), (3, 16)]:
        h = h @ p[f'lora_mlp.layers.{i}.weight'].T + p[f'lora_mlp.layers.{i}.bias']
        h = torch.nn.functional.group_norm(h, groups, p[f'lora_mlp.layers.{i + 1}.weight'], p[f'lora_mlp.layers.{i + 1}.bias'])
        h = h * torch.sigmoid(h)
    omega = h @ p['lora_mlp.layers.6.weight'].T + p['lora_mlp.layers.6.bias']
    assert omega.shape == (4, 18)
    pixels = x.flatten(2).transpose(1, 2) # [N, HW, C_in]
    expected = pixels @ p['weight'].flatten(1).T + p['bias']
    for i in range(18):
        A_i, B_i, E_i = p['lora_A'][4 * i:4 * (i + 1)].flatten(1), p['lora_B'][:, 4 * i:4 * (i + 1)], p['lora_bias'][4 * i:4 * (i + 1)]
        expected = expected + omega[:, i, None, None] * (pixels @ A_i.T @ B_i.T + E_i.sum(0))
    expected = expected.transpose(1, 2).reshape(4, 768, 3, 3)
    with torch.no_grad():
        got = layer(x, emb)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize('kwargs', [dict(bases=0, rank=4), dict(bases=4, rank=0)])
def test_bad_sizes_are_refused(kwargs):
    with pytest.raises(ValueError):
        lora.ComposedLoRAConv(in_channels=4, out_channels=4, kernel=1, num_dims=2, **kwargs)


@pytest.mark.parametrize('widths', [[], [0, 4], [-2]])
def test_bad_mlp_widths_are_refused(widths):
    with pytest.raises(ValueError):
        lora.CompositionMLP(in_features=8, hidden_widths=widths, out_features=3)


@pytest.mark.parametrize('path', ['forward', 'merged_forward', 'per_sample_merged_forward', 'low_rank_forward'])
def test_low_precision_activations_keep_their_dtype(path, device):
    # EDM's --fp16 runs the U-Net in half precision with fp32 parameters: float16 on a GPU, bfloat16 stands in on the CPU.
    # forward(): the UC-LoRA MLP (in float32) on the embedding, then the path the layer picks; the others, each path itself.
    torch.manual_seed(5)
    layer = lora.UCLoRAConv.from_base(torch.nn.Conv2d(8, 24, 3, padding=1), bases=3, rank=2, emb_channels=16, mlp_widths=[8])
    layer.to(device)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_bias.normal_()
    x, emb = torch.randn(2, 8, 6, 6).to(device), torch.randn(2, 16).to(device)
    omega = layer.lora_mlp(emb)[:1 if path == 'merged_forward' else 2] # merged: one condition for the batch
    low_dtype = torch.float16 if device == 'cuda' else torch.bfloat16
    low = layer(x.to(low_dtype), emb) if path == 'forward' else getattr(layer, path)(x.to(low_dtype), omega)
    assert low.dtype == low_dtype
    full = layer.reference_forward(x, omega)
    assert (low.float() - full).abs().max() <= 0.05 * full.abs().max()


@pytest.mark.parametrize('num_dims,kernel,num_classes', [(1, 1, 0), (1, 1, 3), (2, 3, 2), (0, 1, 0), (0, 1, 2)])
def test_non_compositional_time_lora_uses_each_samples_own_step(num_dims, kernel, num_classes):
    torch.manual_seed(6)
    layer = lora.TimeClassLoRAConv.from_base(make_base(num_dims, kernel), rank=2, time_steps=7, time_bases=3, num_classes=num_classes,
                                             compositional=False)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.lora_table is None and layer.lora_A.shape[0] == (7 + num_classes) * 2, 'one basis per step, no table'
    x, t = activations(num_dims, 4, 6, 5), torch.tensor([0, 6, 3, 3])
    c = torch.randn(4, num_classes) if num_classes else None
    # Reference: the formula with one-hot step weights in omega, which weighs all 7 step LoRAs.
    one_hot = torch.nn.functional.one_hot(t, 7).float()
    expected = reference(layer, x, torch.cat([one_hot] + ([c] if num_classes else []), dim=1))
    got = layer(x, t, c)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


#----------------------------------------------------------------------------
# from_base() and adopt_base() refuse any base layer whose function base_forward() would not reproduce.

class EDMLikeConv2d(torch.nn.Module):
    """Stand-in for EDM's training.networks.Conv2d (not imported here): weight, bias, up, down, and a
    forward of conv2d(x, w, padding=kernel // 2) plus bias when neither up nor down."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down, self.fused_resample = in_channels, out_channels, up, down, False
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = torch.nn.Parameter(torch.randn(out_channels)) if kernel and bias else None

    def forward(self, x):
        assert not (self.up or self.down)
        return torch.nn.functional.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


class EDMLikeLinear(torch.nn.Module):
    """Stand-in for EDM's training.networks.Linear: x @ w.t() plus bias."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.randn(out_features))

    def forward(self, x):
        return (x @ self.weight.to(x.dtype).t()).add_(self.bias.to(x.dtype))


class NormalisedConv2d(torch.nn.Conv2d):
    """A Conv2d that normalises its weight in its forward, as EDM2's MPConv (with its eps, so that a zero weight stays
    zero): a plain Conv2d's attributes, another function."""

    def forward(self, x, gain=1):
        w = self.weight / (1e-4 + torch.linalg.vector_norm(self.weight, dim=[1, 2, 3], keepdim=True)) * (gain / self.weight[0].numel() ** 0.5)
        return torch.nn.functional.conv2d(x, w, self.bias, padding=self.padding)


class NormalisedLinear(torch.nn.Linear):
    """A Linear that normalises its weight in its forward, as EDM2's MPConv on a 2-D weight."""

    def forward(self, x, gain=1):
        w = self.weight / (1e-4 + torch.linalg.vector_norm(self.weight, dim=1, keepdim=True)) * (gain / self.weight.shape[1] ** 0.5)
        return torch.nn.functional.linear(x, w, self.bias)


class Float32Only(torch.nn.Conv2d):
    """A convolution whose forward refuses anything but float32, so that adoption cannot check it."""

    def forward(self, x):
        assert x.dtype == torch.float32, 'float32 only'
        return super().forward(x)


def zero_weight(base):
    """base with its weight at zero, as EDM's proj starts: its own weight cannot tell what its forward does with one."""
    with torch.no_grad():
        base.weight.zero_()
    return base


class NoWeight(torch.nn.Module):
    pass


def lora_like(base, kernel=None, base_bias=None, num_dims=None):
    """A LoRA layer shaped after base's weight (so only the property under test can be refused)."""
    shape = base.weight.shape if getattr(base, 'weight', None) is not None else (10, 6, 3, 3)
    return lora.ComposedLoRAConv(in_channels=shape[1], out_channels=shape[0], kernel=kernel or (shape[-1] if len(shape) > 2 else 1),
        num_dims=len(shape) - 2 if num_dims is None else num_dims, bases=2, rank=2,
        base_bias=(getattr(base, 'bias', None) is not None) if base_bias is None else base_bias)


REFUSED = [
    ('stride 2d',       lambda: torch.nn.Conv2d(6, 10, 3, stride=2, padding=1),            None, r'stride \(2, 2\); LoRA layers reproduce stride 1 only'),
    ('stride 1d',       lambda: torch.nn.Conv1d(6, 10, 1, stride=2),                       None, r'stride \(2,\); LoRA layers reproduce stride 1 only'),
    ('dilation',        lambda: torch.nn.Conv2d(6, 10, 3, padding=1, dilation=2),          None, r'dilation \(2, 2\); LoRA layers reproduce dilation 1 only'),
    ('groups',          lambda: torch.nn.Conv2d(6, 10, 1, groups=2),                       None, r'groups 2; LoRA layers reproduce groups 1 only'),
    ('depthwise',       lambda: torch.nn.Conv1d(6, 6, 1, groups=6),                        None, r'groups 6; LoRA layers reproduce groups 1 only'),
    ('padding 0',       lambda: torch.nn.Conv2d(6, 10, 3),                                 None, r'padding \(0, 0\) with kernel \(3, 3\); LoRA layers reproduce padding kernel // 2 = \(1, 1\) only'),
    ('padding 2',       lambda: torch.nn.Conv2d(6, 10, 3, padding=2),                      None, r'padding \(2, 2\) with kernel \(3, 3\)'),
    ('padding mixed',   lambda: torch.nn.Conv2d(6, 10, 3, padding=(1, 0)),                 None, r'padding \(1, 0\) with kernel \(3, 3\)'),
    ('padding 1 k1',    lambda: torch.nn.Conv1d(6, 10, 1, padding=1),                      None, r'padding \(1,\) with kernel \(1,\)'),
    ('padding valid',   lambda: torch.nn.Conv2d(6, 10, 3, padding='valid'),                None, r"padding 'valid' with kernel \(3, 3\)"),
    ('padding same k2', lambda: torch.nn.Conv2d(6, 10, 2, padding='same'),                 None, r"padding 'same' with kernel \(2, 2\); LoRA layers reproduce padding kernel // 2 = \(1, 1\) only"),
    ('padding_mode',    lambda: torch.nn.Conv2d(6, 10, 3, padding=1, padding_mode='reflect'), None, r"padding_mode 'reflect'; LoRA layers reproduce padding_mode 'zeros' only"),
    ('circular',        lambda: torch.nn.Conv1d(6, 10, 1, padding_mode='circular'),        None, r"padding_mode 'circular'"),
    ('transposed',      lambda: torch.nn.ConvTranspose2d(6, 10, 1),                        None, r'transposed convolution'),
    ('edm up',          lambda: EDMLikeConv2d(6, 10, 3, up=True),                          None, r'up=True \(resampling\); LoRA layers reproduce a plain convolution only'),
    ('edm down',        lambda: EDMLikeConv2d(6, 10, 1, down=True),                        None, r'down=True \(resampling\)'),
    ('kernel',          lambda: torch.nn.Conv2d(6, 10, 3, padding=1),                      dict(kernel=1), r'kernel \(3, 3\); LoRA layer has kernel \(1, 1\)'),
    ('1d base, 2d lora', lambda: torch.nn.Conv1d(6, 10, 1),                                dict(num_dims=2), r'is not a Conv2d weight'),
    ('channels',        lambda: torch.nn.Conv2d(6, 11, 1),                                 None, None), # LoRA layer built 6 -> 10 below
    ('bias missing',    lambda: torch.nn.Conv2d(6, 10, 1, bias=False),                     dict(base_bias=True), r'base layer has no bias; LoRA layer was built with base_bias=True'),
    ('bias extra',      lambda: torch.nn.Conv1d(6, 10, 1),                                 dict(base_bias=False), r'base layer has a bias; LoRA layer was built with base_bias=False'),
    ('no weight',       lambda: NoWeight(),                                                None, r'base layer NoWeight has no weight'),
    ('edm kernel 0',    lambda: EDMLikeConv2d(6, 10, 0),                                   None, r'base layer EDMLikeConv2d has no weight'),
    ('linear, 1d lora', lambda: torch.nn.Linear(6, 10),                                    dict(num_dims=1), r'is not a Conv1d weight'),
    ('conv, linear lora', lambda: torch.nn.Conv1d(6, 10, 1),                               dict(num_dims=0), r'is not a Linear weight'),
    # What the attributes cannot tell: a forward that computes another function of the same weight.
    ('normalised conv', lambda: NormalisedConv2d(6, 10, 3, padding=1),                    None, r'base layer NormalisedConv2d computes something other than conv\(x, W\) \+ b'),
    ('normalised zero', lambda: zero_weight(NormalisedConv2d(6, 10, 1)),                  None, r'base layer NormalisedConv2d computes something other than'),
    ('float32 only',    lambda: Float32Only(6, 10, 1),                                     None, r'base layer Float32Only fails on a float64 input \[2, 6, 5, 5\] \(AssertionError: float32 only\)'),
    ('normalised linear', lambda: NormalisedLinear(6, 10),                                 None, r'base layer NormalisedLinear computes something other than x W\^T \+ b'),
]


@pytest.mark.parametrize('make_base,lora_kwargs,message', [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_adopt_base_refuses_what_base_forward_would_not_reproduce(make_base, lora_kwargs, message):
    torch.manual_seed(7)
    base = make_base()
    about_the_base = lora_kwargs is None and message is not None # not a mismatch of a LoRA layer built otherwise
    if message is None: # channels: a LoRA layer for another output width
        layer = lora.ComposedLoRAConv(in_channels=6, out_channels=10, kernel=1, num_dims=2, bases=2, rank=2)
        message = r'base layer weight \[11, 6, 1, 1\] does not match LoRA layer \[10, 6, 1, 1\] \(channels\)'
    else:
        layer = lora_like(base, **(lora_kwargs or {}))
    placeholder = layer.weight
    with pytest.raises(ValueError, match=message) as error:
        layer.adopt_base(base)
    assert '\n' not in str(error.value), 'one line'
    assert str(error.value) == layer.why_not_reproducible(base)
    assert layer.weight is placeholder, 'nothing adopted'
    if about_the_base:
        with pytest.raises(ValueError, match=message): # the one-step constructor refuses it alike
            lora.ComposedLoRAConv.from_base(base, bases=2, rank=2)


ACCEPTED = [
    ('conv1d k1',       lambda: torch.nn.Conv1d(6, 10, 1)),                      # IDDPM's conv_nd(1, ...) qkv / proj_out
    ('conv1d k1 nobias', lambda: torch.nn.Conv1d(6, 10, 1, bias=False)),
    ('conv2d k3 p1',    lambda: torch.nn.Conv2d(6, 10, 3, padding=1)),           # nano diffusion's MyConv
    ('conv2d k3 same',  lambda: torch.nn.Conv2d(6, 10, 3, padding='same')),
    ('conv2d k1 valid', lambda: torch.nn.Conv2d(6, 10, 1, padding='valid')),
    ('conv2d k5 p2',    lambda: torch.nn.Conv2d(6, 10, 5, padding=2, stride=1, dilation=1, groups=1)),
    ('edm k1',          lambda: EDMLikeConv2d(6, 10, 1)),                        # EDM's qkv / proj
    ('edm k3',          lambda: EDMLikeConv2d(6, 10, 3)),
    ('edm k3 nobias',   lambda: EDMLikeConv2d(6, 10, 3, bias=False)),
    ('linear',          lambda: torch.nn.Linear(6, 10)),                         # a transformer's projections
    ('linear nobias',   lambda: torch.nn.Linear(6, 10, bias=False)),
    ('edm linear',      lambda: EDMLikeLinear(6, 10)),
]


@pytest.mark.parametrize('make_base', [r[1] for r in ACCEPTED], ids=[r[0] for r in ACCEPTED])
def test_adopt_base_accepts_reproducible_layers_and_reproduces_them(make_base):
    torch.manual_seed(8)
    base = make_base()
    layer = lora_like(base)
    assert layer.why_not_reproducible(base) is None
    assert layer.adopt_base(base) is layer
    assert layer.weight is base.weight and layer.bias is base.bias, 'the base parameter objects, not copies'
    assert lora.ComposedLoRAConv.from_base(base, bases=2, rank=2).weight is base.weight
    x = activations(base.weight.ndim - 2, 3, 6, 9)
    with torch.no_grad():
        expected, got = base(x), layer.base_forward(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_refusals_would_have_been_wrong():
    # The refused properties matter: with the base parameters forced in, base_forward() differs.
    torch.manual_seed(9)
    for base in [torch.nn.Conv2d(6, 10, 3, padding=1, padding_mode='reflect'), torch.nn.Conv2d(6, 10, 3, padding=1, dilation=2),
                 torch.nn.Conv2d(6, 10, 3, padding='same', dilation=2)]:
        layer = lora_like(base)
        layer.weight, layer.bias = base.weight, base.bias
        x = torch.randn(2, 6, 9, 9)
        with torch.no_grad():
            expected, got = base(x), layer.base_forward(x)
        assert got.shape != expected.shape or (got - expected).abs().max() > 1e-3 * expected.abs().max()
        assert layer.why_not_reproducible(base) is not None
