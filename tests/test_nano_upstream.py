"""Nano diffusion: the module extracted from Dataflowr's notebook, and the sinusoidal-embedding fix
(which keeps the notebook's original beside it, as notebook_sinusoidal_embedding)."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import NANO, PRISTINE_NANO, ROOT, tool
from tools.vendoring.upstream import read_upstream

NOTEBOOK = 'Module18/ddpm_nano_sol.ipynb'
PINNED = read_upstream('dataflowr')['commit']


def extract(tmp_path, tag):
    (tmp_path / tag).mkdir()
    notebook = tmp_path / tag / os.path.basename(NOTEBOOK)
    source = os.path.join(ROOT, 'vendor', '.upstream', 'dataflowr')
    notebook.write_bytes(subprocess.run(['git', '-C', source, 'show', f'{PINNED}:{NOTEBOOK}'], capture_output=True, check=True).stdout)
    out = tmp_path / tag / 'nano_diffusion.py'
    result = tool('vendoring.notebook', notebook, out)
    assert result.returncode == 0, result.stderr
    return out.read_text()


def test_extraction_is_stable_and_keeps_only_the_model_and_ddpm_code(tmp_path):
    first, second = extract(tmp_path, 'first'), extract(tmp_path, 'second')
    assert first == second
    assert first == open(os.path.join(PRISTINE_NANO, 'nano_diffusion.py')).read(), 'vendor/pristine/dataflowr holds the extraction'
    names = [node.name for node in ast.parse(first).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert names == ['sinusoidal_embedding', 'MyConv', 'MyTinyBlock', 'MyTinyUp', 'MyTinyUNet', 'DDPM']
    for left_out in ['import torchvision', 'import matplotlib', 'plt.', 'def show_images', 'MNIST(', 'num_epochs = 50',
                     'def training_loop', 'def generate_image', 'from tqdm', 'tqdm(']:
        assert left_out not in first


def test_extracted_module_runs_as_the_notebook_does():
    script = '''
import torch, nano_diffusion as nd
torch.manual_seed(0)
net = nd.MyTinyUNet(in_c=1, out_c=1, size=32)
model = nd.DDPM(net, 1000, beta_start=0.0001, beta_end=0.02, device=torch.device('cpu'))
x = torch.randn(3, 1, 32, 32)
print(tuple(model.reverse(x, torch.randint(0, 1000, (3,))).shape))       # training passes t as (N,)
print(tuple(model.reverse(x, torch.full((3, 1), 999)).shape))             # the sampler passes (N, 1)
'''
    result = subprocess.run([sys.executable, '-c', script], cwd=PRISTINE_NANO, env=dict(os.environ, PYTHONPATH=PRISTINE_NANO),
                            text=True, capture_output=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[:2] == ['(3, 1, 32, 32)', '(3, 1, 32, 32)']


def vaswani(n, d):
    """Column 2i: sin(t w_i), column 2i+1: cos(t w_i), w_i = 10000^(-2i/d) (Vaswani et al. 2017)."""
    t = np.arange(n)[:, None]
    w = 10000.0 ** (-2 * np.arange(d // 2) / d)
    embedding = np.zeros((n, d))
    embedding[:, 0::2] = np.sin(t * w)
    embedding[:, 1::2] = np.cos(t * w)
    return embedding


SIZES = [(1000, 100), (50, 8)]


@pytest.fixture(scope='module')
def embeddings(tmp_path_factory):
    """{(tree, function, n, d): the embedding} for SIZES, from each tree's own nano_diffusion (one process a tree)."""
    out = tmp_path_factory.mktemp('embeddings')
    functions = {NANO: ['sinusoidal_embedding', 'notebook_sinusoidal_embedding'], PRISTINE_NANO: ['sinusoidal_embedding']}
    found = {}
    for index, (tree, names) in enumerate(functions.items()):
        calls = [(name, n, d) for name in names for n, d in SIZES]
        script = ('import sys, numpy, nano_diffusion as nd\nnumpy.savez(sys.argv[1], '
                  + ', '.join(f'{name}_{n}_{d}=nd.{name}({n}, {d}).double().numpy()' for name, n, d in calls) + ')')
        path = out / f'tree{index}.npz'
        subprocess.run([sys.executable, '-c', script, path], cwd=tree, env=dict(os.environ, PYTHONPATH=tree), check=True)
        saved = np.load(path)
        found.update({(tree, name, n, d): saved[f'{name}_{n}_{d}'] for name, n, d in calls})
    return found


@pytest.mark.parametrize('n,d', SIZES)
def test_fixed_embedding_is_sinusoidal_and_the_original_is_not(n, d, embeddings):
    expected = vaswani(n, d)
    assert np.abs(embeddings[NANO, 'sinusoidal_embedding', n, d] - expected).max() < 1e-4 # float32 sin of arguments up to 999
    original = embeddings[PRISTINE_NANO, 'sinusoidal_embedding', n, d]
    assert np.abs(original - expected).max() > 0.5
    assert np.allclose(original[1], 1), "the original's step 1 is all ones: cos(sin(0))"
    kept = embeddings[NANO, 'notebook_sinusoidal_embedding', n, d]
    assert np.array_equal(kept, original), "the patched module keeps the notebook's embedding (nano.py --embedding notebook)"
