"""UC-LoRA on EDM2's attention, in EDM2's magnitude-preserving form (overlay/edm2/training/lora_edm2.py, patches/edm2/0003):
drop-in against pristine EDM2 (vendor/pristine/edm2), the start as the exact baseline, forced weight normalisation, the
magnitude of the attention output at EDM2's learning rate, "only LoRA", train_edm2.py's flags, and a snapshot of a LoRA run
sampled by pristine EDM2."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import EDM2, HELPERS, PRISTINE_EDM2, ROOT, assert_lora_off_is_pristine, edm2_imported, edm2_training_config, lora_added_to, net_dumps, run_in
from tiny import EDM2_LORA, EDM2_TINY, EDM2_TRAIN, EDM2_TRAIN_LORA
from tools.figures import magnitudes
from tools.vendoring.run import free_port

pytestmark = pytest.mark.first(32) # one of the longer modules, started early (seconds measured by --durations)

CONFIGS = {
    'tiny': EDM2_TINY,
    # EDM2's own U-Net (channel multipliers 1,2,3,4, 3 blocks a level, attention at 16x16 and 8x8) for 16x16 images, 32
    # channels wide, one head a block, unconditional.
    'edm2-narrow': dict(class_name='training.networks_edm2.Precond', img_resolution=16, img_channels=3, label_dim=0, model_channels=32,
                        channels_per_head=32),
}
# Both spellings of "off": the defaults, and the explicit options (train_edm2.py's defaults).
OFF = {'defaults': {}, 'explicit': dict(lora='none', lora_rank=4, lora_bases=18, lora_mlp=[128,64], conv_cond=True)}
ONLY_LORA = dict(EDM2_LORA, conv_cond=False)


@pytest.fixture(scope='module')
def dumps(tmp_path_factory):
    """Every network of this module, built once from seed 7: pristine[config], patched[config, tag]."""
    patched = {(config, tag): dict(kwargs, **extra) for config, kwargs in CONFIGS.items() for tag, extra in dict(OFF, lora=EDM2_LORA).items()}
    patched['tiny', 'only-lora'] = dict(EDM2_TINY, **ONLY_LORA)
    return net_dumps('edm2_net_dump.py', PRISTINE_EDM2, CONFIGS, EDM2, patched, tmp_path_factory.mktemp('edm2-dumps'), seed=7)


@pytest.mark.parametrize('config', CONFIGS)
def test_lora_off_is_bit_identical_to_pristine(config, dumps):
    assert_lora_off_is_pristine(dumps, config, OFF)


@pytest.mark.parametrize('config', CONFIGS)
def test_uc_lora_at_init_computes_the_baseline_exactly(config, dumps):
    pristine, lora = dumps[0][config], dumps[1][config, 'lora']

    # The base parameters keep their names and, drawn before any LoRA weight, the pristine values for the seed.
    added = lora_added_to(pristine, lora)
    assert [name for name in lora['names'] if name in pristine['state']] == pristine['names']
    adapted = [name for name in pristine['names'] if name.endswith(('.attn_qkv.weight', '.attn_proj.weight'))]
    gains = [name for name in added if name.endswith('.lora_gain')]
    assert all('_lora.lora_' in name for name in added)
    assert sorted(gains) == sorted(name.replace('.weight', '_lora.lora_gain') for name in adapted) and gains, 'one LoRA layer an attention MPConv'
    assert all(lora['state'][name].item() == 0 for name in gains)

    # Evaluation (one noise level a sample, and one for the batch as EDM2's sampler passes it) and training mode, to the bit.
    for output in ['output', 'output_one_sigma', 'output_train', 'output_logvar']:
        assert torch.equal(lora[output], pristine[output]), output


def test_only_lora_removes_every_emb_linear_and_emb_gain_and_nothing_else(dumps):
    with_lora, only_lora = dumps[1]['tiny', 'lora'], dumps[1]['tiny', 'only-lora']
    removed = set(with_lora['names']) - set(only_lora['names'])
    assert removed and all(name.endswith(('.emb_linear.weight', '.emb_gain')) for name in removed)
    assert not any('emb_linear' in name or 'emb_gain' in name for name in only_lora['names'])
    assert not set(only_lora['names']) - set(with_lora['names'])
    assert 'unet.emb_noise.weight' in only_lora['names'], 'the embedding feeds UC-LoRA'
    # The base weights are the same as with conv_cond=True (the embedding layers are removed after they are drawn).
    assert all(torch.equal(only_lora['state'][name], with_lora['state'][name]) for name in only_lora['state'])
    assert torch.isfinite(only_lora['output']).all()

#----------------------------------------------------------------------------
# The layer, in this process.

def layer_and_inputs(lora_edm2, in_channels=16, out_channels=48, emb_channels=32, bases=3, rank=2, mlp_widths=[16,8], batch=4):
    """An MPUCLoRA layer and unit-magnitude inputs: x [batch, C_in, 4, 4], the base output y, emb (mp_silu of unit normals, as
    EDM2's U-Net hands its blocks)."""
    torch.manual_seed(0)
    layer = lora_edm2.MPUCLoRA(in_channels=in_channels, out_channels=out_channels, emb_channels=emb_channels, bases=bases, rank=rank, mlp_widths=mlp_widths)
    x = torch.randn(batch, in_channels, 4, 4)
    y = torch.randn(batch, out_channels, 4, 4)
    emb = lora_edm2.mp_silu(torch.randn(batch, emb_channels))
    return layer, x, y, emb


def rms(x):
    return x.square().mean().sqrt().item()


def test_the_lora_weights_are_force_normalised_in_training_as_mpconv_normalises_its_own():
    with edm2_imported(EDM2):
        from training import lora_edm2, networks_edm2
        layer, x, y, emb = layer_and_inputs(lora_edm2)
        with torch.no_grad():
            for param in layer.parameters():
                param.mul_(torch.rand_like(param) * 3 + 0.1) # rows of any magnitude, as Adam's steps would leave them
            layer.lora_gain.fill_(0.7)
        stored = {name: param.detach().clone() for name, param in layer.named_parameters()}

        # Evaluation leaves the weights as they are (as MPConv's forward does), normalising them on the fly.
        layer.eval()
        out_eval = layer(x, y, emb)
        assert all(torch.equal(param, stored[name]) for name, param in layer.named_parameters())

        layer.train()
        out_train = layer(x, y, emb)
        # Each A_i [r, C_in], B_i [C_out, r] and MLP weight is stored as MPConv stores its own weight after a training pass.
        pairs = [(layer.lora_A[i], stored['lora_A'][i]) for i in range(3)] + [(layer.lora_B[i], stored['lora_B'][i]) for i in range(3)]
        pairs += [(mlp_layer.weight, stored[f'lora_mlp.layers.{index}.weight']) for index, mlp_layer in enumerate(layer.lora_mlp.layers)]
        for weight, before in pairs:
            mpconv = networks_edm2.MPConv(before.shape[1], before.shape[0], kernel=[]).train()
            with torch.no_grad():
                mpconv.weight.copy_(before)
                mpconv(torch.randn(1, before.shape[1]))
            assert torch.allclose(weight, mpconv.weight, rtol=1e-5, atol=0)
            assert torch.allclose(weight.square().mean(dim=1).sqrt(), torch.ones(weight.shape[0]), rtol=5e-3), 'unit RMS rows (but for eps)'
        assert layer.lora_gain.item() == pytest.approx(0.7), 'the gain is a gain: not normalised'
        # The same function either way: the normalisation in the forward pass makes the stored magnitude irrelevant.
        assert torch.allclose(out_train, out_eval, rtol=0, atol=1e-3 * out_eval.abs().max().item())

        # And differentiably: a function of normalize(w) has a gradient orthogonal to each row of w
        # but for eps. Summed over the rows, as a row of 2 (B's, rank 2) can have its gradient almost along it where the
        # gradient before the normalisation is.
        (layer(x, y, emb) * torch.randn_like(y)).sum().backward()
        for weight, dim in [(layer.lora_A, 2), (layer.lora_B, 2), *[(mlp_layer.weight, 1) for mlp_layer in layer.lora_mlp.layers]]:
            along = (weight.grad * weight).sum(dim).abs().sum() / (weight.grad.norm(dim=dim) * weight.norm(dim=dim)).sum()
            assert weight.grad.abs().max() > 0 and along < 1e-3


def test_the_gain_starts_at_zero_receives_a_gradient_and_is_the_only_lora_weight_that_does_at_first():
    with edm2_imported(EDM2):
        from training.training_loop import EDM2Loss
        import dnnlib
        torch.manual_seed(0)
        net = dnnlib.util.construct_class_by_name(**EDM2_TINY, **EDM2_LORA).train()
        with torch.no_grad():
            net.unet.out_gain.fill_(1) # EDM2's own zero output gain stops every gradient into the U-Net until it opens
        images, labels = torch.randn(16, 3, 8, 8), torch.eye(10)[torch.arange(16) % 10]
        EDM2Loss(P_mean=-0.8, P_std=1.6)(net, images, labels).mean().backward()
        lora = {name: param for name, param in net.named_parameters() if '_lora.' in name}
        gains = {name: param for name, param in lora.items() if name.endswith('lora_gain')}
        assert len(gains) == 8, 'qkv and proj of the 4 attention blocks'
        assert all(gain.item() == 0 and gain.grad.item() != 0 for gain in gains.values())
        # The bases and the MLP reach the output through g = 0 only: no gradient yet (as LoRA's A with B = 0).
        assert all(torch.count_nonzero(param.grad) == 0 for name, param in lora.items() if name not in gains)

        # One step of EDM2's optimizer (Adam, betas 0.9 and 0.99) at its presets' learning rate: each gain moves by the rate.
        torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99)).step()
        assert all(abs(gain.item()) == pytest.approx(0.01, rel=1e-3) for gain in gains.values())


@pytest.mark.parametrize('gain', [0.25, 1.0, 4.0, -4.0])
def test_the_output_keeps_the_base_outputs_magnitude_whatever_the_gain(gain):
    # The paper's sizes (18 bases of rank 4, MLP 128, 64) on a 64-channel attention projection with unit-magnitude inputs.
    with edm2_imported(EDM2):
        from training import lora_edm2
        layer, x, y, emb = layer_and_inputs(lora_edm2, in_channels=64, out_channels=64, emb_channels=128, bases=18, rank=4, mlp_widths=[128,64], batch=16)
        with torch.no_grad():
            layer.lora_gain.fill_(gain)
            out = layer.eval()(x, y, emb)
    assert rms(out) == pytest.approx(rms(y), rel=0.15)
    assert rms(out - y) > 0.1 * rms(y), 'the LoRA term is there'


def test_the_magnitude_plots_lora_update_is_the_one_the_layer_adds():
    """tools/figures/magnitudes.py measures each sample's update dW of the base weight: the layer's output times
    sqrt(1 + g^2), minus the base output, is dW x (a 1x1 convolution); zero at g = 0."""
    with edm2_imported(EDM2):
        from training import lora_edm2
        layer, x, y, emb = layer_and_inputs(lora_edm2)
        with torch.no_grad():
            assert magnitudes.lora_update(layer, emb, lora_edm2).abs().max() == 0, 'g = 0 at initialisation'
            layer.lora_gain.fill_(0.7)
            update = magnitudes.lora_update(layer.eval(), emb, lora_edm2)
            added = layer(x, y, emb) * (1 + 0.7 ** 2) ** 0.5 - y
    assert update.shape == (4, 48, 16)
    assert torch.allclose(torch.einsum('noi,nihw->nohw', update, x), added, atol=1e-5)


def attention_output_rms(net, steps):
    """The RMS of every attention branch's output (attn_proj's, with its LoRA term where there is one), at each of `steps`
    training steps of EDM2's optimizer at its presets' learning rate, on the same images, labels and noise for any network."""
    def record(module, inputs, output):
        step_rms.append(rms(output.detach()))
    for block in net.unet.modules():
        if getattr(block, 'num_heads', 0):
            last = block.attn_proj_lora if block.attn_proj_lora is not None else block.attn_proj
            last.register_forward_hook(record)
    from training.training_loop import EDM2Loss
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99))
    data = torch.Generator().manual_seed(1)
    history = []
    for step in range(steps):
        step_rms = []
        images, labels = torch.rand(16, 3, 8, 8, generator=data) * 2 - 1, torch.eye(10)[torch.randint(10, [16], generator=data)]
        torch.manual_seed(step) # the loss's noise
        loss = EDM2Loss(P_mean=-0.8, P_std=1.6)(net, images, labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(step_rms)
    return torch.tensor(history)


def test_the_attention_output_keeps_the_baselines_magnitude_at_edm2s_learning_rate():
    with edm2_imported(EDM2):
        import dnnlib
        nets = {}
        for tag, options in [('baseline', {}), ('lora', EDM2_LORA)]:
            torch.manual_seed(0) # the same base weights
            nets[tag] = dnnlib.util.construct_class_by_name(**EDM2_TINY, **options).train()
        baseline, lora = attention_output_rms(nets['baseline'], 10), attention_output_rms(nets['lora'], 10)
    gains = [param.item() for name, param in nets['lora'].named_parameters() if name.endswith('lora_gain')]
    assert max(abs(gain) for gain in gains) > 0.02 and not torch.equal(lora[-1], baseline[-1]), 'the LoRA terms are on'
    assert torch.equal(lora[0], baseline[0]), 'the first step starts from the baseline'
    assert ((lora / baseline - 1).abs() < 0.1).all(), f'attention output RMS, LoRA / baseline, step by step:\n{lora / baseline}'


def test_the_parameter_count_of_edm2_img64_s_with_the_papers_uc_lora_sizes(edm2_dataset):
    # EDM2's ImageNet 64x64 network S as train_edm2.py sets it up, with UC-LoRA at the paper's CIFAR-10 sizes (the flags'
    # defaults, as test_train_edm2_records_the_lora_options_in_the_network_options checks), built on the meta device.
    with edm2_imported(EDM2) as train_edm2:
        config = edm2_training_config(train_edm2, f'--data={edm2_dataset}', '--preset=edm2-img64-s')
        with torch.device('meta'):
            net = train_edm2.dnnlib.util.construct_class_by_name(**config.network_kwargs, **dict(OFF['explicit'], lora='uc'), img_resolution=64,
                                                                 img_channels=3, label_dim=1000)
    sizes = {name: param.numel() for name, param in net.named_parameters()}
    baseline = sum(size for name, size in sizes.items() if '_lora.' not in name)
    # Each attention MPConv [C_out, C_in] gains 18 bases of A [4, C_in] and B [C_out, 4], a gain, and an MLP from the
    # 768-wide embedding: 768 x 128 + 128 x 64 + 64 x 18 weights, no biases.
    adapted = [param.shape for name, param in net.named_parameters() if name.endswith(('attn_qkv.weight', 'attn_proj.weight'))]
    per_layer = [18 * 4 * (c_in + c_out) + 1 + 768 * 128 + 128 * 64 + 64 * 18 for c_out, c_in, _, _ in adapted]
    assert len(adapted) == 30 and sum(sizes.values()) - baseline == sum(per_layer)
    assert (baseline, sum(sizes.values()) - baseline) == (280_209_381, 7_625_502) # README.md, "EDM2"


#----------------------------------------------------------------------------
# "Only LoRA" in this process.

def test_only_lora_leaves_no_residual_branch_scaled_by_the_embedding_and_no_parameter_unused():
    with edm2_imported(EDM2):
        import dnnlib
        from training.training_loop import EDM2Loss
        torch.manual_seed(0)
        net = dnnlib.util.construct_class_by_name(**EDM2_TINY, **ONLY_LORA).train()
        # Every parameter takes part (DDP rejects unused ones): each has a gradient after a step.
        EDM2Loss(P_mean=-0.8, P_std=1.6)(net, torch.randn(4, 3, 8, 8), torch.eye(10)[:4]).mean().backward()
        assert all(param.grad is not None for param in net.parameters())

        # With the LoRA terms off, no block's output depends on the embedding any more; with conv_cond=True it does.
        torch.manual_seed(0)
        scaled = dnnlib.util.construct_class_by_name(**EDM2_TINY, **EDM2_LORA).eval()
        with torch.no_grad():
            for param_name, param in scaled.named_parameters():
                if param_name.endswith('emb_gain'):
                    param.fill_(1)
        x, embs = torch.randn(2, 8, 8, 8), [torch.randn(2, 8), torch.randn(2, 8)] # the tiny U-Net's embedding is 8 wide
        for network, depends_on_emb in [(net.eval(), False), (scaled, True)]:
            block = network.unet.enc['8x8_block0']
            with torch.no_grad():
                outputs = [block(x, emb) for emb in embs]
            assert torch.equal(*outputs) == (not depends_on_emb)


def test_only_lora_needs_uc_lora():
    with edm2_imported(EDM2):
        import dnnlib
        with pytest.raises(ValueError, match=r'conv_cond=False needs lora="uc"'):
            dnnlib.util.construct_class_by_name(**EDM2_TINY, conv_cond=False)

#----------------------------------------------------------------------------
# The shared LoRA core and EDM2's MPConv.

def test_the_shared_core_refuses_edm2s_mpconv_whose_forward_normalises_its_weight():
    # The core as EDM's tree has it: beside torch_utils, its classes persistent (which needs the module registered).
    spec = importlib.util.spec_from_file_location('training.lora_core', os.path.join(ROOT, 'overlay', 'common', 'lora.py'))
    with edm2_imported(EDM2):
        core = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = core # edm2_imported() removes it with the other training modules
        spec.loader.exec_module(core)
        from training.networks_edm2 import MPConv
        torch.manual_seed(0)
        for kernel, kind in [([1,1], r'conv\(x, W\) \+ b'), ([3,3], r'conv\(x, W\) \+ b'), ([], r'x W\^T \+ b')]:
            for device in ['cpu', 'meta']: # train_edm2.py checks the options on a meta network
                with torch.device(device):
                    base = MPConv(64, 96, kernel=kernel)
                with pytest.raises(ValueError, match=rf'^base layer MPConv computes something other than {kind} with its weight') as error:
                    core.UCLoRAConv.from_base(base, bases=3, rank=2, emb_channels=8)
                assert '\n' not in str(error.value)

        # Why: forced in, the core's plain convolution of MPConv's stored weight (unit elements) is sqrt(C_in) times too large.
        base = MPConv(64, 64, kernel=[1,1])
        layer = core.ComposedLoRAConv(in_channels=64, out_channels=64, kernel=1, num_dims=2, bases=3, rank=2, base_bias=False)
        layer.weight = base.weight
        x = torch.randn(8, 64, 8, 8)
        with torch.no_grad():
            assert rms(base(x)) == pytest.approx(1, rel=0.05) and rms(layer.base_forward(x)) == pytest.approx(8, rel=0.05)

#----------------------------------------------------------------------------
# train_edm2.py.

def test_train_edm2_records_the_lora_options_in_the_network_options(edm2_dataset):
    with edm2_imported(EDM2) as train_edm2:
        config = edm2_training_config(train_edm2, f'--data={edm2_dataset}', *EDM2_TRAIN, *EDM2_TRAIN_LORA, '--conv-cond=False')
        defaults = edm2_training_config(train_edm2, f'--data={edm2_dataset}', *EDM2_TRAIN, '--lora=uc')
    assert {key: config.network_kwargs[key] for key in ONLY_LORA} == ONLY_LORA
    assert {key: defaults.network_kwargs[key] for key in OFF['explicit']} == dict(OFF['explicit'], lora='uc'), "the flags' defaults"


BAD_FLAGS = [
    (['--lora=dora'], "Invalid value for '--lora'"),
    (['--lora-rank=0'], "Invalid value for '--lora-rank'"),
    (['--lora-bases=0'], "Invalid value for '--lora-bases'"),
    (['--lora-mlp=16,x'], "Invalid value for '--lora-mlp'"),
    (['--conv-cond=maybe'], "Invalid value for '--conv-cond'"),
    # Found by building the network on the meta device.
    (['--lora=uc', '--lora-mlp=16,0'], 'network options: composition MLP widths must be positive integers, got [16, 0]'),
    (['--conv-cond=False'], 'network options: conv_cond=False needs lora="uc"'),
    (['--lora=uc', '--channels-per-head=64'], 'network options: the U-Net has no attention layers to condition'),
]


@pytest.mark.parametrize('flags,message', BAD_FLAGS)
def test_bad_lora_flags_are_usage_errors(flags, message, edm2_dataset):
    import click
    with edm2_imported(EDM2) as train_edm2:
        with pytest.raises(click.UsageError) as error: # BadParameter is a UsageError
            edm2_training_config(train_edm2, f'--data={edm2_dataset}', *EDM2_TRAIN, *flags)
    assert message in error.value.format_message() and '\n' not in error.value.format_message()


def test_a_bad_combination_on_the_command_line_is_one_usage_message(edm2_dataset, tmp_path):
    flags, message = BAD_FLAGS[-2]
    result = run_in(EDM2, ['train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={edm2_dataset}', *EDM2_TRAIN, *flags], expect_ok=False)
    assert result.returncode == 2 and 'Traceback' not in result.stdout, result.stdout
    [error] = [line for line in result.stdout.splitlines() if line.startswith('Error:')]
    assert message in error
    assert not os.path.exists(tmp_path / 'run'), 'nothing written'

#----------------------------------------------------------------------------
# A LoRA run's snapshot in pristine EDM2.

@pytest.fixture(scope='module')
def lora_run(edm2_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('edm2-lora-run') / 'run'
    run_in(EDM2, ['train_edm2.py', f'--outdir={run_dir}', f'--data={edm2_dataset}', *EDM2_TRAIN, *EDM2_TRAIN_LORA])
    return run_dir


def test_a_lora_snapshot_loads_and_samples_in_pristine_edm2(lora_run, tmp_path):
    with open(lora_run / 'training_options.json') as f:
        network_options = json.load(f)['network_kwargs']
    assert {key: network_options[key] for key in EDM2_LORA} == EDM2_LORA
    assert not os.path.exists(os.path.join(PRISTINE_EDM2, 'training', 'lora_edm2.py')), 'the pickle must bring what it runs'

    # generate_images.py's loading and its sampler, in a process that has only the pristine tree (or the patched one) on its path.
    snapshot = lora_run / 'network-snapshot-0000001-0.100.pkl'
    processes = {tree: (tmp_path / f'{tag}.pt', run_in_background(tree, [os.path.join(HELPERS, 'edm2_sample.py'), snapshot, tmp_path / f'{tag}.pt']))
                 for tag, tree in [('pristine', PRISTINE_EDM2), ('patched', EDM2)]}
    samples = {}
    for tree, (out, process) in processes.items():
        output = process.communicate()[0]
        assert process.returncode == 0, f'{tree}:\n{output[-6000:]}'
        samples[tree] = torch.load(out)
    pristine, patched = samples[PRISTINE_EDM2], samples[EDM2]
    gains = [name for name in pristine['state'] if name.endswith('_lora.lora_gain')]
    assert len(gains) == 8 and all(pristine['state'][name].item() != 0 for name in gains), 'a trained LoRA network'
    assert pristine['images'].shape == (4, 3, 8, 8) and torch.isfinite(pristine['images']).all()
    assert torch.equal(pristine['images'], patched['images'])


def run_in_background(tree, args):
    """run_in()'s process, started and not waited for: the trees sample side by side."""
    return subprocess.Popen([sys.executable, *[str(a) for a in args]], cwd=tree, env=dict(os.environ, PYTHONPATH=tree, MASTER_PORT=free_port()),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
