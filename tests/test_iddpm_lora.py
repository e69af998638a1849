"""TimeLoRA and ClassLoRA in improved-diffusion: table init, interpolation, the time step the table sees."""

import sys

import numpy as np
import pytest
import torch

from conftest import IDDPM

sys.path.insert(0, IDDPM)
from improved_diffusion import lora_iddpm  # noqa: E402
from improved_diffusion.lora import TimeClassLoRAConv, interpolation_table  # noqa: E402
from improved_diffusion.script_util import create_gaussian_diffusion, create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402


@pytest.mark.parametrize('steps,bases', [(4001, 11), (1000, 4), (1000, 10), (100, 7), (50, 2)])
def test_table_is_the_two_nearest_basis_interpolation(steps, bases):
    table = interpolation_table(steps, bases).double().numpy()
    assert table.shape == (steps, bases)
    assert (table >= 0).all() and np.allclose(table.sum(1), 1, atol=1e-6)
    tau = np.arange(bases) * (steps - 1) / (bases - 1) # basis time steps, equally spaced from 0 to T-1
    for t in range(steps):
        i = min(np.searchsorted(tau, t, side='right') - 1, bases - 2)
        expected = np.zeros(bases)
        expected[i] = (tau[i + 1] - t) / (tau[i + 1] - tau[i])
        expected[i + 1] = (t - tau[i]) / (tau[i + 1] - tau[i])
        assert np.allclose(table[t], expected, atol=1e-6), t
    for i, position in enumerate(tau):
        if position == int(position):
            assert table[int(position)][i] == 1, 'exact at basis steps'


def test_paper_setting_puts_a_basis_every_400_steps():
    table = interpolation_table(4001, 11)
    for i in range(11):
        assert torch.equal(table[400 * i], torch.eye(11)[i])


def make_layer(**kwargs):
    torch.manual_seed(0)
    layer = TimeClassLoRAConv(in_channels=8, out_channels=24, kernel=1, num_dims=1, rank=2, **kwargs)
    layer.adopt_base(torch.nn.Conv1d(8, 24, 1))
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_composed_lora_interpolates_the_neighbouring_bases():
    layer = make_layer(time_steps=1001, time_bases=5, num_classes=0) # bases at 0, 250, 500, 750, 1000
    x = torch.randn(1, 8, 6)
    at = lambda t: layer(x, torch.tensor([t]))
    for t, lower, upper in [(100, 0, 250), (620, 500, 750), (999, 750, 1000)]:
        alpha = (t - lower) / (upper - lower)
        expected = (1 - alpha) * at(lower) + alpha * at(upper)
        assert (at(t) - expected).abs().max() <= 1e-5 * expected.abs().max(), t


def test_class_lora_is_linear_in_the_class_vector():
    layer = make_layer(time_steps=101, time_bases=3, num_classes=10)
    x, t = torch.randn(1, 8, 6), torch.tensor([40])
    airplane, horse = torch.eye(10)[[0]], torch.eye(10)[[7]]
    for lam in [0.25, 0.5, 1.5, -1.0]: # interpolation and extrapolation (paper Section 5.6)
        mixed = layer(x, t, (1 - lam) * airplane + lam * horse)
        expected = (1 - lam) * layer(x, t, airplane) + lam * layer(x, t, horse)
        assert (mixed - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_random_table_init_is_not_the_interpolation():
    torch.manual_seed(0)
    layer = TimeClassLoRAConv(in_channels=8, out_channels=8, kernel=1, num_dims=1, rank=2, time_steps=4001, time_bases=11, num_classes=0, table_init='random')
    table = layer.lora_table.weight
    assert abs(table.mean().item()) < 0.02 and abs(table.std().item() - 1) < 0.02 and (table < 0).any()


def test_rescaled_time_steps_are_recovered_exactly():
    for steps in [1000, 4000, 4001]:
        t = torch.arange(steps)
        for rescaled in [True, False]:
            received = t.float() * (1000.0 / steps) if rescaled else t # what _WrappedModel hands the model
            cond = lora_iddpm.condition(dict(steps=steps, rescaled=rescaled, num_classes=0), received, None)
            assert torch.equal(cond[:, 0].long(), t)


def tiny_model(**flags):
    flags = dict(model_and_diffusion_defaults(), image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True,
                 noise_schedule='cosine', time_lora=True, **flags)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    seen = []
    first_lora_layer = next(m for m in model.modules() if isinstance(m, lora_iddpm.IDDPMLoRAConv))
    first_lora_layer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[1][:, 0].long().tolist()))
    return model, diffusion, seen, flags


@pytest.mark.parametrize('rescale_timesteps', [True, False])
@pytest.mark.parametrize('use_checkpoint', [False, True])
def test_the_table_sees_the_original_step_in_training_and_respaced_sampling(rescale_timesteps, use_checkpoint):
    model, diffusion, seen, flags = tiny_model(diffusion_steps=401, rescale_timesteps=rescale_timesteps, use_checkpoint=use_checkpoint)
    x = torch.randn(3, 3, 32, 32)

    t = torch.tensor([0, 123, 400])
    losses = diffusion.training_losses(model, x, t)
    losses['loss'].mean().backward() # through IDDPM's checkpoint() when use_checkpoint
    assert seen[0] == [0, 123, 400]
    assert all(p.grad is not None for name, p in model.named_parameters() if 'lora_B' in name)

    respaced = create_gaussian_diffusion(steps=401, learn_sigma=True, noise_schedule='cosine',
                                         rescale_timesteps=rescale_timesteps, timestep_respacing='50')
    seen.clear()
    index = torch.tensor([0, 20, 49])
    with torch.no_grad():
        respaced.p_sample(model, x, index)
    assert seen[0] == [respaced.timestep_map[i] for i in [0, 20, 49]]
    assert seen[0][-1] == 400 and seen[0][0] == 0


@pytest.mark.parametrize('flags,classes,merged', [
    (dict(), None, True),                                                     # unconditional sampling
    (dict(class_cond=True, class_lora=True), [4, 4, 4], True),                # one class for the batch
    (dict(class_cond=True, class_lora=True), [4, 1, 4], False),               # each sample its class
    (dict(lora_compositional=False, lora_rank=2), None, False),               # one LoRA a step: nothing to merge
])
def test_a_batch_sharing_its_condition_merges_it_into_the_weights_with_the_same_output(flags, classes, merged, monkeypatch):
    model, _, seen, _ = tiny_model(**dict(diffusion_steps=21, rescale_timesteps=False, **flags))
    merges = []
    merged_forward = TimeClassLoRAConv.merged_forward
    monkeypatch.setattr(TimeClassLoRAConv, 'merged_forward', lambda self, *args: merges.append(self) or merged_forward(self, *args))
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([17, 17, 17]) # the samplers' step: the same for every sample
    kwargs = {} if classes is None else dict(y=torch.tensor(classes))
    with torch.no_grad():
        output = model(x, t, **kwargs)
        assert bool(merges) == merged
        shared = classes is None or len(set(classes)) == 1
        assert seen[0] == ([17] if shared else [17, 17, 17]), 'one condition row stands for a batch that shares it'
        rows = lora_iddpm.condition # the reference: every sample its own row, through the per-sample paths
        monkeypatch.setattr(lora_iddpm, 'condition', lambda *args: rows(*args).expand(3, -1))
        merges.clear()
        expected = model(x, t, **kwargs)
    assert seen[1] == [17, 17, 17] and not merges
    assert (output - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_steps_beyond_the_table_are_an_error():
    model, diffusion, _, _ = tiny_model(diffusion_steps=101, rescale_timesteps=False)
    with pytest.raises(ValueError, match=r'time steps must lie in \[0, 100\]'):
        model(torch.randn(1, 3, 32, 32), torch.tensor([101]))


def test_non_compositional_time_lora_has_one_lora_per_step():
    model, diffusion, seen, flags = tiny_model(diffusion_steps=21, lora_compositional=False, lora_rank=2)
    baseline, _ = create_model_and_diffusion(**dict(flags, time_lora=False))
    layers = [m for m in model.modules() if isinstance(m, lora_iddpm.IDDPMLoRAConv)]
    assert layers and all(layer.lora_table is None for layer in layers)
    added = sum(21 * 2 * (layer.weight.shape[1] + layer.weight.shape[0]) for layer in layers) # A_t: r x C_in, B_t: C_out x r
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model) - count(baseline) == added
    losses = diffusion.training_losses(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 20]))
    losses['loss'].mean().backward()
    assert seen[0] == [0, 20]
