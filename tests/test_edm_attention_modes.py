"""EDM's attention-conditioning modes beside UC-LoRA: ClassLoRA and adaLN (in this process, tiny networks)."""

import os
import pickle

import pytest
import torch

from conftest import EDM, HELPERS, PRISTINE_EDM, cuda_only, run_in, tool
from tiny import EDM_ADM, EDM_DDPMPP


@pytest.fixture(scope='module')
def edm():
    """EDM's patched tree on sys.path; build(**kwargs) makes an EDMPrecond from seed 0, in eval mode."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(EDM)
        from training import lora_edm, networks
        def build(config=EDM_DDPMPP, **kwargs):
            torch.manual_seed(0)
            return networks.EDMPrecond(**dict(config, **kwargs)).eval()
        yield build, networks, lora_edm


def inputs(net, n=4):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn([n, net.img_channels, net.img_resolution, net.img_resolution], generator=generator)
    sigma = torch.tensor([0.02, 0.5, 3.0, 60.0])[:n]
    return x, sigma


def attention_blocks(net):
    return [block for block in net.modules() if getattr(block, 'num_heads', 0)]


# Layers that EDM initialises at (or near) zero: the attention output, the U-Net's output convolutions.
ZERO_INIT = ('proj.weight', 'out_conv.weight', 'aux_conv.weight')


def randomise(net, names):
    """Non-zero values for parameters that start at or near zero (LoRA up-projections, adaLN, ZERO_INIT), as training gives them."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith(names):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

#----------------------------------------------------------------------------
# ClassLoRA: an unconditional base, one LoRA a class, weighted by the class vector.

@pytest.mark.parametrize('config', [EDM_DDPMPP, EDM_ADM], ids=['ddpmpp', 'adm'])
def test_class_lora_base_is_the_unconditional_network_and_starts_as_it(config, edm):
    build, networks, lora_edm = edm
    net, unconditional = build(config, lora='class', lora_rank=3), build(config, label_dim=0)
    assert net.model.map_label is None, 'the class enters the attention layers only'
    base_names = set(unconditional.state_dict())
    added = [name for name in net.state_dict() if name not in base_names]
    assert base_names <= set(net.state_dict()), 'base parameters and buffers keep their upstream names'
    assert added and all(name.endswith(('.qkv.lora_A', '.qkv.lora_B', '.proj.lora_A', '.proj.lora_B')) for name in added), 'no MLP, no bias term'
    for block in attention_blocks(net):
        assert block.qkv.lora_A.shape[0] == 10 * 3 and block.proj.lora_B.shape[1] == 10 * 3, 'one rank-3 basis a class'

    # At initialisation, with the same base weights, the unconditional network's output for any class.
    unconditional.load_state_dict({name: value for name, value in net.state_dict().items() if name in base_names})
    x, sigma = inputs(net)
    with torch.no_grad():
        expected = unconditional(x, sigma)
        for labels in [torch.eye(10)[[0, 3, 5, 9]], torch.full([4, 10], 0.5)]:
            assert relative_error(net(x, sigma, labels), expected) <= 1e-5


@pytest.fixture(scope='module')
def class_layer(edm):
    """A trained-looking ClassLoRA qkv layer (non-zero up-projections) and an input for it."""
    build, _, _ = edm
    net = build(lora='class', lora_rank=2)
    randomise(net, ('lora_B',))
    layer = attention_blocks(net)[0].qkv
    x = torch.randn([3, layer.weight.shape[1], 8, 8], generator=torch.Generator().manual_seed(3))
    return layer, x


def test_class_lora_is_linear_in_the_class_vector(class_layer):
    layer, x = class_layer
    generator = torch.Generator().manual_seed(4)
    c_a, c_b = torch.eye(10)[[0, 1, 2]], torch.rand([3, 10], generator=generator)
    with torch.no_grad():
        out_a, out_b, out_zero = layer(x, c_a), layer(x, c_b), layer(x, torch.zeros(3, 10))
        for l in [0.0, 0.25, 0.7, 1.0, 1.5]: # interpolation, and extrapolation beyond b
            assert relative_error(layer(x, (1 - l) * c_a + l * c_b), (1 - l) * out_a + l * out_b) <= 1e-5, l
        for a in [-1.0, -0.3, 0.5, 2.0]: # scaling scales the LoRA update
            assert relative_error(layer(x, a * c_b) - out_zero, a * (out_b - out_zero)) <= 1e-5, a
    assert not torch.allclose(out_a, out_b), 'different classes, different outputs'


def test_a_one_hot_vector_selects_one_class_lora(class_layer):
    layer, x = class_layer
    r = layer.rank
    for k in [0, 6]:
        A, B = layer.lora_A[k * r:(k + 1) * r], layer.lora_B[:, k * r:(k + 1) * r]
        with torch.no_grad():
            base = torch.nn.functional.conv2d(x, layer.weight, layer.bias)
            expected = base + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, A), B[:, :, None, None])
            assert relative_error(layer(x, torch.eye(10)[[k] * 3]), expected) <= 1e-5, k

#----------------------------------------------------------------------------
# adaLN: scale and shift of norm2 (the attention's input normalisation), regressed from emb.

@pytest.mark.parametrize('config', [EDM_DDPMPP, EDM_ADM], ids=['ddpmpp', 'adm'])
def test_adaln_at_initialisation_leaves_every_block_unchanged(config, edm):
    build, _, _ = edm
    baseline, adaln = build(config), build(config, adaln=True)
    base_state = baseline.state_dict()
    for name, value in base_state.items(): # drawn first: the baseline's values for the seed, under the same names
        assert torch.equal(adaln.state_dict()[name], value), name
    added = [name for name in adaln.state_dict() if name not in base_state]
    assert added and all(name.endswith(('.norm2.adaln.weight', '.norm2.adaln.bias')) for name in added)

    generator = torch.Generator().manual_seed(5)
    for base_block, block in zip(attention_blocks(baseline), attention_blocks(adaln)):
        x = torch.randn([2, block.in_channels, 8, 8], generator=generator)
        emb = torch.randn([2, block.emb_channels], generator=generator)
        with torch.no_grad():
            proj = torch.randn(block.proj.weight.shape, generator=generator) * 0.1 # so that the attention counts in the output
            base_block.proj.weight.copy_(proj), block.proj.weight.copy_(proj)
            assert torch.equal(block(x, emb), base_block(x, emb))
        assert block.norm2.adaln.weight.shape == (2 * block.out_channels, block.emb_channels), 'a scale and a shift a channel'

    x, sigma = inputs(baseline)
    labels = torch.eye(10)[[0, 1, 2, 3]]
    with torch.no_grad():
        assert relative_error(adaln(x, sigma, labels), baseline(x, sigma, labels)) <= 1e-5
        randomise(adaln, ZERO_INIT)
        before = adaln(x, sigma, labels)
        randomise(adaln, ('adaln.weight',))
        assert relative_error(adaln(x, sigma, labels), before) > 1e-3, 'once trained, adaLN acts'


def test_adaln_without_conv_cond_is_conditioned_through_the_attention_only(edm):
    build, _, _ = edm
    model = build(adaln=True, conv_cond=False).model # the U-Net: its output for given noise labels
    assert not any('.affine.' in name for name, _ in model.named_parameters())
    generator = torch.Generator().manual_seed(6)
    x = torch.randn([2, 3, 16, 16], generator=generator)
    low, high, labels = torch.full([2], -1.0), torch.full([2], 1.0), torch.eye(10)[[0, 1]]
    run = lambda noise, labels: model(x, noise, labels)
    with torch.no_grad():
        randomise(model, ZERO_INIT)
        assert torch.equal(run(low, labels), run(high, labels)), 'with adaLN at zero nothing conditions the network'
        randomise(model, ('adaln.weight',))
        assert relative_error(run(high, labels), run(low, labels)) > 1e-4, 'the noise level reaches it through adaLN'
        assert relative_error(run(low, torch.eye(10)[[4, 5]]), run(low, labels)) > 1e-4, 'so does the class (map_label feeds emb)'


#----------------------------------------------------------------------------
# Bad combinations, and pickles that load with only the pristine tree.

@pytest.mark.parametrize('kwargs,message', [
    (dict(adaln=True, lora='uc'), 'adaLN and LoRA condition the same attention layers'),
    (dict(lora='class', label_dim=0), 'ClassLoRA needs class labels'),
    (dict(lora='class', conv_cond=False), '--conv-cond=False needs --lora=uc or --adaln=True'),
    (dict(conv_cond=False), '--conv-cond=False needs --lora=uc or --adaln=True'),
])
def test_bad_combinations_are_one_line_errors(kwargs, message, edm):
    build, _, _ = edm
    with pytest.raises(ValueError, match=message.replace('+', r'\+')) as error:
        build(**kwargs)
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('mode', ['class', 'adaln'])
def test_pristine_edm_loads_and_samples_the_new_modes(mode, edm, tmp_path):
    build, _, _ = edm
    net = build(lora='class') if mode == 'class' else build(adaln=True, conv_cond=False)
    randomise(net, ('lora_B', 'adaln.weight') + ZERO_INIT)
    snapshot = tmp_path / 'network-snapshot.pkl'
    with open(snapshot, 'wb') as f:
        pickle.dump(dict(ema=net), f) # as training_loop writes its snapshots

    # Only the pristine tree on the path: the network unpickles and samples with pristine generate.py's sampler ...
    run_in(PRISTINE_EDM, [os.path.join(HELPERS, 'edm_load.py'), snapshot, tmp_path / 'pristine.pt', '--sample'])
    pristine = torch.load(tmp_path / 'pristine.pt')
    assert pristine['ema'].keys() == net.state_dict().keys()
    assert torch.isfinite(pristine['samples']).all()
    # ... exactly as the patched tree's network samples (edm_load.py's latents, labels and sampler, here).
    from generate import edm_sampler
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn([4, net.img_channels, net.img_resolution, net.img_resolution], generator=generator)
    with torch.no_grad():
        samples = edm_sampler(net, latents, torch.eye(net.label_dim)[[0, 1, 2, 3]], num_steps=4,
                              randn_like=lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype))
    assert torch.equal(pristine['samples'], samples)

    # The same check as a user runs it (make smoke does, on every EDM smoke run).
    if mode == 'class':
        result = tool('checks.pristine_check', snapshot, tmp_path / 'missing.pkl')
        assert result.returncode == 1, 'the missing file fails the check'
        assert f'{snapshot}: loads in pristine EDM' in result.stdout and 'missing.pkl: no such file' in result.stdout
        assert 'qkv.lora_A' in result.stdout

#----------------------------------------------------------------------------
# --fp16=True: EDMPrecond runs the U-Net in float16 on CUDA (fp32 parameters, each layer casting its weights to
# the activations' dtype). On the CPU the same U-Net call, in half precision: close to float32, forward and backward.

@pytest.mark.parametrize('shared_sigma', [False, True], ids=['per-sample-sigma', 'one-sigma'])
@pytest.mark.parametrize('mode', [dict(lora='uc'), dict(lora='class', lora_rank=3), dict(adaln=True, conv_cond=False)],
                         ids=['uc-lora', 'classlora', 'adaln'])
def test_the_unet_runs_in_half_precision_with_attention_conditioning(mode, shared_sigma, edm):
    build, networks, lora_edm = edm
    net = build(**mode)
    randomise(net, ('lora_B', 'lora_bias', 'adaln.weight', *ZERO_INIT))
    x, sigma = inputs(net)
    if shared_sigma: # the samplers' call: one sigma for the batch
        sigma = sigma[2:3]
    labels = torch.eye(10)[[3, 1, 4, 1]]
    c_in, c_noise = 1 / (net.sigma_data ** 2 + sigma ** 2).sqrt(), sigma.log() / 4 # EDMPrecond's
    conditioning = [p for name, p in net.named_parameters() if 'lora_' in name or 'adaln' in name]
    output_grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    results = {}
    for dtype in [torch.float32, torch.float16]:
        output = net.model((c_in.reshape(-1, 1, 1, 1) * x).to(dtype), c_noise.flatten(), labels)
        assert output.dtype == dtype
        grads = torch.autograd.grad((output.float() * output_grad).sum(), conditioning)
        results[dtype] = [output.float(), *grads]
    assert conditioning and all(p.dtype == torch.float32 for p in conditioning), 'the parameters stay in float32'
    # The output, then each conditioning gradient, compared as a whole (norm of the difference over the norm): float16's
    # rounding (2^-11) adds up over the network's layers, and a ClassLoRA lora_A gradient sums float16 products over
    # every position of the samples of its class: measured up to 0.022 on an AMD EPYC host (max-abs: 0.0215), 0.002
    # to 0.008 for the other modes. A LoRA layer left in float32 fails the dtype check; a lost or wrong gradient, this.
    for half, full in zip(results[torch.float16], results[torch.float32]):
        assert torch.isfinite(half).all() and half.dtype == torch.float32
        assert ((half - full).norm() / full.norm()).item() < 5e-2


@cuda_only
@pytest.mark.parametrize('shared_sigma', [False, True], ids=['per-sample-sigma', 'one-sigma'])
@pytest.mark.parametrize('mode', [dict(lora='uc'), dict(lora='class', lora_rank=3)], ids=['uc-lora', 'classlora'])
def test_fp16_on_cuda_runs_the_lora_layers_in_half_precision(mode, shared_sigma, edm):
    # On a GPU, EDMPrecond(use_fp16=True) itself casts the U-Net's input to float16: every LoRA layer then computes in
    # float16 from float32 parameters, and the result (and each conditioning gradient) is close to force_fp32's.
    build, networks, lora_edm = edm
    net = build(**mode, use_fp16=True)
    randomise(net, ('lora_B', 'lora_bias', *ZERO_INIT))
    net.cuda()
    x, sigma = (t.cuda() for t in inputs(net))
    if shared_sigma:
        sigma = sigma[2:3]
    labels = torch.eye(10, device='cuda')[[3, 1, 4, 1]]
    lora_layers = [module for module in net.modules() if hasattr(module, 'lora_A')]
    seen = []
    for layer in lora_layers:
        layer.register_forward_hook(lambda module, args, output: seen.append((args[0].dtype, output.dtype)))
    conditioning = [p for name, p in net.named_parameters() if 'lora_' in name]
    output_grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).cuda()
    results = {}
    for force_fp32 in [False, True]:
        seen.clear()
        output = net(x, sigma, labels, force_fp32=force_fp32)
        layer_dtype = torch.float32 if force_fp32 else torch.float16
        assert lora_layers and seen == [(layer_dtype, layer_dtype)] * len(lora_layers)
        results[force_fp32] = [output, *torch.autograd.grad((output * output_grad).sum(), conditioning)]
    assert all(p.dtype == torch.float32 for p in conditioning), 'the parameters stay in float32'
    for half, full in zip(results[False], results[True]): # the output, then each conditioning gradient
        assert torch.isfinite(half).all() and half.dtype == torch.float32
        assert relative_error(half, full) < 2e-2
