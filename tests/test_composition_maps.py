"""tools/figures/composition_maps.py on a snapshot of each upstream: the composition weights it reads are
those the LoRA layers compute (checked against each layer's own table or MLP, fed by hand), its
matrices are cosine similarities, its PNGs are written; snapshots without composition weights, a
missing file or the wrong --kind are one-line errors."""

import json
import pickle
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from tiny import EDM_ONE_LEVEL, IDDPM_TINY
from conftest import EDM, IDDPM, NANO, tool
from tools.figures import composition_maps

sys.path.insert(0, IDDPM)
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402

sys.path.insert(0, NANO)
import nano  # noqa: E402
import nano_diffusion as nd  # noqa: E402

UC_LORA = dict(lora='uc', lora_bases=5, lora_rank=2, lora_mlp=[16, 8])


def edm_snapshot(path, **network_kwargs):
    """A network-snapshot-*.pkl as EDM's training loop writes it (the network under 'ema'); returns the network."""
    # EDM goes on the path here, not when this module is collected: its torch_utils would then be found by
    # every module collected after this one (the LoRA core's tests load the core without EDM).
    if EDM not in sys.path:
        sys.path.insert(0, EDM)
    import dnnlib
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(class_name='training.networks.EDMPrecond', **EDM_ONE_LEVEL, **network_kwargs).eval()
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net), f)
    return net


def iddpm_state(path, **flags):
    """A tiny improved-diffusion model built with the project's flags, its state dict saved as image_train.py does."""
    options = dict(model_and_diffusion_defaults(), **IDDPM_TINY, time_lora=True)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**dict(options, **flags))
    torch.save(model.state_dict(), path)
    return model.state_dict()


def maps(snapshot, out, *args):
    """Run the tool in this process (the vendor trees are imported once for every test); its JSON and matrices."""
    composition_maps.main([str(snapshot), '--out', str(out), *[str(a) for a in args]])
    return json.loads((out / 'similarity.json').read_text()), np.load(out / 'similarity.npz')


def error(*args):
    """The tool's message when it refuses its arguments: sys.exit's text, printed without a traceback."""
    with pytest.raises(SystemExit) as refused:
        composition_maps.main([str(a) for a in args])
    message = refused.value.code
    assert isinstance(message, str) and '\n' not in message, message
    return message


def assert_cosine_similarities(saved, out):
    for matrix in [*saved['layers'], saved['mean']]:
        assert np.allclose(np.diagonal(matrix), 1, atol=1e-5), 'each condition is like itself'
        assert np.allclose(matrix, matrix.T, atol=1e-6)
    assert np.allclose(saved['mean'], saved['layers'].mean(0), atol=1e-6)
    unit = saved['weights'] / np.linalg.norm(saved['weights'], axis=2, keepdims=True)
    assert np.allclose(saved['layers'], unit @ unit.transpose(0, 2, 1), atol=1e-5), 'the matrices are of the saved weights'
    for png in ['mean.png', 'layers.png']:
        assert PIL.Image.open(out / png).size[0] > 500


def test_edm_weights_are_each_mlp_on_edms_own_embedding_of_each_noise_level(tmp_path):
    net = edm_snapshot(tmp_path / 'network-snapshot-000000.pkl', **UC_LORA)
    out = tmp_path / 'maps'
    summary, saved = maps(tmp_path / 'network-snapshot-000000.pkl', out, '--sigmas', 32, '--class', 2, '--each-layer')
    names = [name.removeprefix('model.') for name, module in net.named_modules() if hasattr(module, 'lora_mlp')]
    assert len(names) == 2 and list(saved['names']) == names and list(summary['layers']) == names
    sigmas = np.geomspace(0.002, 80, 32)
    assert np.allclose(saved['conditions'], sigmas) and saved['weights'].shape == (len(names), 32, 5)

    # By hand, for one noise level (in the second batch of the tool's forward passes): EDMPrecond's
    # c_noise = ln(sigma) / 4, SongUNet's mapping network with the class label, then each layer's MLP.
    level = 17
    unet = net.model
    with torch.no_grad():
        emb = unet.map_noise(torch.tensor([sigmas[level]], dtype=torch.float32).log() / 4)
        emb = emb.reshape(1, 2, -1).flip(1).reshape(1, -1) # SongUNet's positional embedding: cos before sin
        emb = emb + unet.map_label(torch.eye(4)[[2]] * np.sqrt(4))
        emb = F.silu(unet.map_layer1(F.silu(unet.map_layer0(emb))))
        for name, weights in zip(names, saved['weights']):
            expected = net.get_submodule(f'model.{name}').lora_mlp(emb)[0]
            assert torch.allclose(torch.from_numpy(weights[level]), expected, rtol=1e-4, atol=1e-5), name

    assert_cosine_similarities(saved, out)
    assert all(PIL.Image.open(out / 'layers' / f'{name}.png').size[0] > 500 for name in names)
    assert summary['kind'] == 'edm' and summary['mean']['near'] is not None and summary['mean']['far'] is not None


def test_edm_snapshot_without_uc_lora_is_a_one_line_error(tmp_path):
    edm_snapshot(tmp_path / 'network-snapshot-000000.pkl')
    result = tool('figures.composition_maps', tmp_path / 'network-snapshot-000000.pkl')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().count('\n') == 0 and 'no UC-LoRA layers' in result.stderr, result.stderr


def test_iddpm_weights_are_the_rows_of_each_layers_table(tmp_path):
    state = iddpm_state(tmp_path / 'ema_0.9999_000000.pt', diffusion_steps=401, lora_bases=5) # bases every 100 steps
    summary, saved = maps(tmp_path / 'ema_0.9999_000000.pt', tmp_path / 'maps')
    steps = np.arange(0, 401, 3) # 401 steps, at most 200 in the maps: every 3rd
    assert np.array_equal(saved['conditions'], steps)
    tables = {key.removesuffix('.lora_table.weight'): value for key, value in state.items() if key.endswith('.lora_table.weight')}
    assert len(tables) > 2 and list(saved['names']) == list(tables)
    for name, weights in zip(saved['names'], saved['weights']):
        assert np.array_equal(weights, tables[name][steps].numpy()), name
    assert_cosine_similarities(saved, tmp_path / 'maps')
    # The interpolation table at init: near steps share their two bases, steps 200 or more apart none.
    assert 0.8 < summary['mean']['near'] < 1 and summary['mean']['far'] == 0


def test_iddpm_snapshots_without_a_table_are_one_line_errors(tmp_path):
    iddpm_state(tmp_path / 'non-compositional.pt', diffusion_steps=21, lora_compositional=False)
    assert 'non-compositional' in error(tmp_path / 'non-compositional.pt')
    iddpm_state(tmp_path / 'baseline.pt', diffusion_steps=21, time_lora=False)
    assert 'no TimeLoRA layers' in error(tmp_path / 'baseline.pt')
    assert 'a snapshot of iddpm, not of nano' in error(tmp_path / 'baseline.pt', '--kind', 'nano')
    assert 'no such file' in error(tmp_path / 'missing.pt')


def test_nano_weights_are_each_mlp_on_the_sinusoidal_embedding_of_each_step(tmp_path, monkeypatch):
    # nano.py's own main() writes the checkpoint, in this process: one optimizer step on 2 digits.
    monkeypatch.setattr(sys, 'argv', ['nano.py', '--cond', 'uclora', '--train-digits', '2', '--batch-size', '2', '--epochs', '1',
                                      '--samples', '0', '--data', 'mnist5k', '--out', str(tmp_path / 'run')])
    nano.main()
    summary, saved = maps(tmp_path / 'run' / 'checkpoint.pt', tmp_path / 'maps')
    assert np.array_equal(saved['conditions'], np.arange(0, 1000, 10)) and len(saved['names']) == 21

    # By hand, for step 500: the network as nano.py saved it, each layer's MLP on the time embedding.
    network = nd.MyTinyUNet(cond='uclora')
    network.load_state_dict(torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=False)['network'])
    with torch.no_grad():
        emb = network.time_embed(torch.tensor([500]))
        for name, weights in zip(saved['names'], saved['weights']):
            expected = network.get_submodule(str(name)).lora_mlp(emb)[0]
            assert torch.allclose(torch.from_numpy(weights[50]), expected, rtol=1e-4, atol=1e-6), name
    assert_cosine_similarities(saved, tmp_path / 'maps')
    assert summary['kind'] == 'nano' and summary['near'] == "0 < |t - t'| <= 50" and summary['far'] == "|t - t'| >= 500"


def test_maps_of_a_smoke_or_untrained_snapshot_say_so(tmp_path):
    smoke = tmp_path / 'edm-cifar10-uncond-with-lora-smoke' / 'network-snapshot-000001.pkl'
    assert composition_maps.training_note(str(smoke), 'edm', {}).startswith('SMOKE RUN')
    assert composition_maps.training_note(str(tmp_path / 'my-run' / 'network-snapshot-000000.pkl'), 'edm', {}).startswith('UNTRAINED')
    assert composition_maps.training_note(str(tmp_path / 'my-run' / 'ema_0.9999_000000.pt'), 'iddpm', {}).startswith('UNTRAINED')
    assert composition_maps.training_note(str(tmp_path / 'my-run' / 'checkpoint.pt'), 'nano', {'epoch': 0}).startswith('UNTRAINED')
    assert composition_maps.training_note(str(tmp_path / 'my-run' / 'checkpoint.pt'), 'nano', {'epoch': 3}) == ''
    assert composition_maps.training_note(str(tmp_path / 'my-run' / 'network-snapshot-000200.pkl'), 'edm', {}) == ''
