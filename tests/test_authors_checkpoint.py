"""tools/drivers/authors_checkpoint.py on tiny networks pickled in the layout of the paper authors' EDM fork.

The fixture is written here, from what their release shows (github.com/lthilnklover/diffusion_lora):
training/nn.py holds EDM's layers (Linear, Conv2d, GroupNorm, AttentionOp), training/networks.py
imports them and training.lora, and hands the block's emb to qkv and proj; training/lora.py has the
non-persistent LoraInjectedConv (torch Conv2d conv, lora_down, lora_up; a bias [m*r, C_out]; a float
scale or, as their commented-out line, a Parameter [1]; comp_weights, a ModuleList of (Linear,
GroupNorm, SiLU) blocks and a Linear). nn.py and networks.py are cut from pristine EDM's networks.py
as the authors cut theirs; lora.py is written below. The authors' network is built, pickled and run
in a process of its own, with only the fixture and pristine EDM on its path; the converter runs here.
"""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import EDM, PRISTINE_EDM, tool
from tiny import EDM_DDPMPP_AS_TRAIN_PY

FIXTURE_LORA = '''\
"""The authors' LoRA layer, as their pickles store it (a test fixture)."""

import torch
from training.nn import GroupNorm, Linear


class LoraInjectedConv(torch.nn.Module): # Not persistent, as theirs: pickles name it training.lora.LoraInjectedConv.
    def __init__(self, base, emb_channels, rank, bases, widths, trainable_scale):
        super().__init__()
        self.lora_rank = rank
        kernel = base.weight.shape[-1]
        self.conv = torch.nn.Conv2d(base.in_channels, base.out_channels, kernel, padding=kernel // 2, bias=base.bias is not None)
        self.conv.weight = base.weight
        if base.bias is not None:
            self.conv.bias = base.bias
        self.lora_down = torch.nn.Conv2d(base.in_channels, rank * bases, kernel, padding=kernel // 2, bias=False)
        self.lora_up = torch.nn.Conv2d(rank * bases, base.out_channels, kernel, padding=kernel // 2, bias=False)
        self.bias = torch.nn.Parameter(torch.zeros(rank * bases, base.out_channels))
        self.scale = torch.nn.Parameter(torch.full([1], 0.7)) if trainable_scale else 1.0
        blocks = []
        for width in widths:
            blocks.append(torch.nn.Sequential(Linear(in_features=emb_channels, out_features=width), GroupNorm(num_channels=width), torch.nn.SiLU()))
            emb_channels = width
        self.comp_weights = torch.nn.ModuleList(blocks + [Linear(in_features=emb_channels, out_features=bases)])
        self.bypass = False

    def forward(self, x, emb):
        w = emb
        for layer in self.comp_weights:
            w = layer(w)
        w = w.repeat_interleave(self.lora_rank, dim=1) # [N, m*r]: each basis' weight on its r rows
        delta = self.lora_up(w[:, :, None, None] * self.lora_down(x)) + (w @ self.bias)[:, :, None, None]
        return self.conv(x) + self.scale * delta


def inject(net, rank, bases, widths, trainable_scale):
    """Replace qkv and proj of every attention block, as the authors do after building the network."""
    for block in [m for m in net.modules() if getattr(m, 'num_heads', 0)]:
        for name in ['qkv', 'proj']:
            setattr(block, name, LoraInjectedConv(getattr(block, name), block.emb_channels, rank, bases, widths, trainable_scale))
'''

# Builds each variant, pickles it as EDM's training loop does, loads the pickle back and runs it.
FIXTURE_RUN = '''\
import json, pickle, sys
import torch
from training import augment, loss, networks
from training.lora import inject

variants, out = json.loads(sys.argv[1]), sys.argv[2]
for name, variant in variants.items():
    torch.manual_seed(0)
    net = networks.EDMPrecond(**variant['net'])
    inject(net, **variant['lora'])
    with torch.no_grad(): # as if trained: no tensor at its zero (or 1e-5, DDPM++'s) init, so that every one matters
        for param in net.parameters():
            if param.abs().max() < 1e-3:
                param.normal_(0, 0.3)
    snapshot = dict(ema=net.eval().requires_grad_(False), loss_fn=loss.EDMLoss(), augment_pipe=augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1),
                    dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='cifar10-32x32.zip', resolution=16))
    with open(f'{out}/{name}.pkl', 'wb') as f:
        pickle.dump(snapshot, f)
    with open(f'{out}/{name}.pkl', 'rb') as f:
        net = pickle.load(f)['ema']
    generator = torch.Generator().manual_seed(1)
    x = torch.randn([4, 3, 16, 16], generator=generator)
    labels = torch.eye(net.label_dim)[[1, 4, 7, 9]] if net.label_dim else None
    sigmas = {'each': torch.tensor([0.02, 0.3, 2.0, 40.0]), 'shared': torch.tensor(1.5)} # shared: one sigma for the batch, as the samplers pass it
    with torch.no_grad():
        outputs = {key: net(x, sigma, labels) for key, sigma in sigmas.items()}
    torch.save(dict(x=x, labels=labels, sigmas=sigmas, outputs=outputs, tensors=len(net.state_dict())), f'{out}/{name}-reference.pt')
'''

VARIANTS = {
    # Their release: a float scale of 1, two hidden MLP widths.
    'release': dict(net=dict(EDM_DDPMPP_AS_TRAIN_PY, label_dim=0), lora=dict(rank=2, bases=3, widths=[16, 8], trainable_scale=False)),
    # Their commented-out trainable scale, one hidden width, a class-conditional network (the class enters emb).
    'trainable-scale': dict(net=dict(EDM_DDPMPP_AS_TRAIN_PY, label_dim=10), lora=dict(rank=3, bases=2, widths=[8], trainable_scale=True)),
}
EXPECTED = {
    'release': dict(lora_bases=3, lora_rank=2, lora_mlp=[16, 8], lora_bias=True, lora_scale='fixed'),
    'trainable-scale': dict(lora_bases=2, lora_rank=3, lora_mlp=[8], lora_bias=True, lora_scale='trainable'),
}


def write_fixture(top):
    """training/{__init__,nn,networks,lora,loss,augment}.py in the authors' layout, under `top`."""
    with open(os.path.join(PRISTINE_EDM, 'training', 'networks.py')) as f:
        source = f.read()
    layers_start = source.index('#----------------------------------------------------------------------------\n# Unified routine')
    layers_end = source.index('#----------------------------------------------------------------------------\n# Unified U-Net block')
    layers = source[layers_start:layers_end]
    networks = source[:layers_start] + 'from training.nn import Linear, Conv2d, GroupNorm, AttentionOp\nfrom training.lora import LoraInjectedConv\n\n' + source[layers_end:]
    for call in ['self.qkv(self.norm2(x))', 'self.proj(a.reshape(*x.shape))']: # every attention layer has LoRA here: always hand it emb
        assert networks.count(call) == 1, call
        networks = networks.replace(call, call[:-1] + ', emb)')
    training = top / 'training'
    training.mkdir()
    files = {'__init__.py': '', 'nn.py': 'import numpy as np\nimport torch\nfrom torch_utils import persistence\n\n' + layers,
             'networks.py': networks, 'lora.py': FIXTURE_LORA}
    for name in ['loss.py', 'augment.py']: # unchanged in their fork
        with open(os.path.join(PRISTINE_EDM, 'training', name)) as f:
            files[name] = f.read()
    for name, text in files.items():
        (training / name).write_text(text)


@pytest.fixture(scope='module')
def authors(tmp_path_factory):
    """{variant: (pickle path, reference)}: the authors' networks, pickled and run with the fixture's modules only."""
    top = tmp_path_factory.mktemp('authors')
    write_fixture(top)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(top), PRISTINE_EDM]))
    result = subprocess.run([sys.executable, '-c', FIXTURE_RUN, json.dumps(VARIANTS), str(top)], cwd=top, env=env, text=True, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return {name: (top / f'{name}.pkl', torch.load(top / f'{name}-reference.pt', weights_only=True)) for name in VARIANTS}


@pytest.fixture(scope='module')
def converter():
    """The tool, imported into this process with EDM's tree on the path (as it puts it there itself)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(EDM)
        from tools.drivers import authors_checkpoint
        yield authors_checkpoint


def test_the_authors_pickle_needs_their_modules(authors, converter):
    path, _ = authors['release']
    with open(path, 'rb') as f, pytest.raises(ImportError, match='training.nn'): # their networks.py source imports it
        pickle.load(f)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_every_tensor_maps_and_the_network_computes_the_same(variant, authors, converter, tmp_path):
    path, reference = authors[variant]
    out = tmp_path / 'converted.pkl'
    summary = converter.convert(str(path), str(out))
    assert {key: summary[key] for key in EXPECTED[variant]} == EXPECTED[variant]
    assert summary['source_tensors'] == summary['copied_tensors'] == summary['target_tensors'] == reference['tensors']
    assert summary['lora_layers'] == 6, 'qkv and proj of the three 8x8 attention blocks'
    assert not os.path.exists(str(out) + '.partial')

    with open(out, 'rb') as f: # as generate.py loads it
        snapshot = pickle.load(f)
    assert list(snapshot) == ['ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs']
    assert snapshot['augment_pipe'].p == 0.12 and snapshot['dataset_kwargs']['resolution'] == 16
    net = snapshot['ema']
    assert type(net.model.enc['8x8_block0'].qkv).__name__ == 'UCLoRAConv'
    with torch.no_grad():
        for key, sigma in reference['sigmas'].items():
            expected = reference['outputs'][key]
            error = (net(reference['x'], sigma, reference['labels']) - expected).abs().max()
            assert error <= 1e-5 * expected.abs().max(), f'{key} sigma: max error {error:.3g}'
        for module in net.modules(): # the LoRA tensors matter to the output compared above
            if hasattr(module, 'lora_B'):
                module.lora_B.zero_()
        expected = reference['outputs']['each']
        assert (net(reference['x'], reference['sigmas']['each'], reference['labels']) - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.fixture(scope='module')
def not_authors(tmp_path_factory):
    """Pickles this tool must refuse: EDM's own network, this project's UC-LoRA snapshot, and others."""
    top = tmp_path_factory.mktemp('not-authors')
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(EDM)
        from training import networks
        contents = {'plain': dict(ema=networks.EDMPrecond(**EDM_DDPMPP_AS_TRAIN_PY)),
                    'ours': dict(ema=networks.EDMPrecond(**EDM_DDPMPP_AS_TRAIN_PY, lora='uc', lora_bases=2, lora_rank=2)),
                    'no-ema': dict(net=1), 'a-function': dict(ema=print)}
    for name, value in contents.items():
        with open(top / f'{name}.pkl', 'wb') as f:
            pickle.dump(value, f)
    (top / 'text.pkl').write_text('not a pickle\n')
    return top


@pytest.mark.parametrize('name,message', [
    ('missing', 'no such file'),
    ('text', 'not an EDM snapshot pickle'),
    ('no-ema', 'a pickle without the key "ema"'),
    ('a-function', 'refused global builtins.print'),
    ('plain', 'not the authors\' layout: no LoRA layers of theirs'),
    ('ours', 'already this project\'s format (UCLoRAConv layers)'),
])
def test_a_file_it_cannot_convert_is_one_line(name, message, converter, not_authors, tmp_path, capsys):
    out = tmp_path / 'out.pkl'
    with pytest.raises(SystemExit) as refused:
        converter.main([str(not_authors / f'{name}.pkl'), '--out', str(out)])
    text = str(refused.value.code)
    assert message in text and '\n' not in text, text
    assert not out.exists() and not os.path.exists(str(out) + '.partial')


def test_the_command_line_says_why_in_one_line(not_authors, tmp_path):
    result = tool('drivers.authors_checkpoint', not_authors / 'plain.pkl', '--out', tmp_path / 'out.pkl')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert result.stderr.strip().count('\n') == 0 and 'no LoRA layers of theirs' in result.stderr, result.stderr
