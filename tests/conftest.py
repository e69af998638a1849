"""Shared paths and helpers. `make test` builds vendor/ first; a missing tree is an error, not a skip."""

import contextlib
import importlib
import os
import subprocess
import sys

import pytest

# `make test` runs one pytest-xdist worker a core: one thread each, for the workers and every process
# they start (torch's default of a thread a core in every one oversubscribes the cores and makes small
# tests many times slower; tiny test batches gain nothing from more threads). Set before torch starts.
os.environ['OMP_NUM_THREADS'] = '1'

import torch  # noqa: E402

from tools.data.synthetic import write_folder  # noqa: E402

from tools import ROOT
from tools.vendoring.run import free_port  # noqa: E402

EDM = os.path.join(ROOT, 'vendor', 'edm')
PRISTINE_EDM = os.path.join(ROOT, 'vendor', 'pristine', 'edm')
EDM2 = os.path.join(ROOT, 'vendor', 'edm2')
PRISTINE_EDM2 = os.path.join(ROOT, 'vendor', 'pristine', 'edm2')
IDDPM = os.path.join(ROOT, 'vendor', 'improved-diffusion')
PRISTINE_IDDPM = os.path.join(ROOT, 'vendor', 'pristine', 'improved-diffusion')
NANO = os.path.join(ROOT, 'vendor', 'dataflowr')
PRISTINE_NANO = os.path.join(ROOT, 'vendor', 'pristine', 'dataflowr')
HELPERS = os.path.join(ROOT, 'tests', 'helpers')


# A test (or parameter) that needs a CUDA GPU: make gpu-check runs it on a GPU machine; elsewhere it skips, saying why.
CUDA_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (make gpu-check on a GPU machine)')]


def cuda_only(test):
    """CUDA_ONLY as a decorator."""
    for mark in CUDA_ONLY:
        test = mark(test)
    return test


def run_in(tree, args, expect_ok=True, launcher=None, timeout=600, env=None):
    """Run a Python script with `tree` as working directory and only `tree` on PYTHONPATH.

    EDM's scripts start a process group on MASTER_PORT (29500 by default): each run gets a free
    port, so that two test runs on one machine do not join each other's group and hang."""
    full_env = dict(os.environ, PYTHONPATH=tree, MASTER_PORT=free_port(), **(env or {}))
    command = (launcher or [sys.executable]) + [str(a) for a in args]
    result = subprocess.run(command, cwd=tree, env=full_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if expect_ok and result.returncode != 0:
        pytest.fail(f'{" ".join(command)} failed ({result.returncode}) in {tree}:\n{result.stdout[-6000:]}')
    return result


# The modules of an EDM2 tree; EDM's tree has modules of the same names.
EDM2_MODULES = ('dnnlib', 'torch_utils', 'training', 'train_edm2')


@contextlib.contextmanager
def edm2_imported(tree):
    """train_edm2 imported from tree into this process. EDM's modules of the same names (dnnlib, torch_utils,
    training), which other tests of this process may have imported, are put aside meanwhile and come back after."""
    def of_edm2(name):
        return name.split('.')[0] in EDM2_MODULES
    aside = {name: module for name, module in sys.modules.items() if of_edm2(name)}
    for name in aside:
        del sys.modules[name]
    sys.path.insert(0, tree)
    try:
        yield importlib.import_module('train_edm2')
    finally:
        sys.path.remove(tree)
        for name in [name for name in sys.modules if of_edm2(name)]:
            del sys.modules[name]
        sys.modules.update(aside)


def edm2_training_config(train_edm2, *flags):
    """The training_loop() arguments that train_edm2.py sets up for these flags, parsed by its own command line."""
    context = train_edm2.cmdline.make_context('train_edm2.py', ['--outdir=unused', *[str(flag) for flag in flags]])
    options = {name: value for name, value in context.params.items() if name not in ('outdir', 'dry_run')}
    return train_edm2.setup_training_config(**options)


def tool(module, *args, cwd=ROOT):
    """Run one of the project's scripts as `make` does: python -m tools.<module> ARGS, from the repository root."""
    return subprocess.run([sys.executable, '-m', f'tools.{module}', *[str(a) for a in args]], cwd=cwd, text=True, capture_output=True)


def nano(*args, expect_ok=True):
    """Run vendor/dataflowr/nano.py ARGS in its tree."""
    result = subprocess.run([sys.executable, 'nano.py', *[str(a) for a in args]], cwd=NANO, text=True, capture_output=True,
                            env=dict(os.environ, PYTHONPATH=NANO))
    if expect_ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def net_dumps(helper, pristine_tree, pristine_configs, tree, configs, out_dir, seed):
    """Build and evaluate networks with tests/helpers/<helper>: pristine_configs {config: kwargs} in
    the pristine tree, configs {(config, tag): kwargs} in the patched one, one process a tree, both
    side by side, every network from `seed`. Returns (pristine {config: dump}, patched {(config, tag): dump}),
    each dump with the parameter names, the state dict and the outputs the helper computed."""
    import json
    import torch
    builds = {pristine_tree: pristine_configs, tree: {'--'.join(key): kwargs for key, kwargs in configs.items()}}
    processes = {}
    for top, built in builds.items():
        top_dir = os.path.join(out_dir, 'pristine' if top == pristine_tree else 'patched')
        os.makedirs(top_dir, exist_ok=True)
        command = [sys.executable, os.path.join(HELPERS, helper), json.dumps(built), str(seed), top_dir]
        processes[top] = (top_dir, subprocess.Popen(command, cwd=top, env=dict(os.environ, PYTHONPATH=top),
                                                    text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    dumps = {}
    for top, (top_dir, process) in processes.items():
        output = process.communicate()[0]
        if process.returncode != 0:
            pytest.fail(f'{helper} failed ({process.returncode}) in {top}:\n{output[-6000:]}')
        dumps[top] = {tag: torch.load(os.path.join(top_dir, f'{tag}.pt')) for tag in builds[top]}
    return dumps[pristine_tree], {tuple(tag.split('--')): dump for tag, dump in dumps[tree].items()}


def assert_same_network(patched, pristine):
    """Same parameter names in the same order, bit-identical values and outputs."""
    import torch
    assert patched['names'] == pristine['names'], 'same parameters in the same order'
    assert list(patched['state']) == list(pristine['state'])
    for name, value in pristine['state'].items():
        assert torch.equal(patched['state'][name], value), name
    for key in pristine:
        if key.startswith('output'):
            assert torch.equal(patched[key], pristine[key]), key


def lora_added_to(pristine, patched):
    """The parameter names the patched network adds to the pristine one, after checking that it keeps every
    pristine parameter under its name with its value for the seed (LoRA's weights are drawn last)."""
    import torch
    for name, value in pristine['state'].items():
        assert torch.equal(patched['state'][name], value), name
    return [name for name in patched['names'] if name not in pristine['state']]


def assert_lora_off_is_pristine(dumps, config, spellings):
    """Each spelling of "LoRA off" builds the pristine network of `config`; dumps as net_dumps returns them."""
    pristine, patched = dumps
    for tag in spellings:
        assert_same_network(patched[config, tag], pristine[config])


def pytest_configure(config):
    config.addinivalue_line('markers', 'first(seconds): start this module early, the longest (by its measured seconds) first')
    config.addinivalue_line('markers', 'smoke: a slow end-to-end check: make smoke runs it, make test does not')
    config.addinivalue_line('markers', 'gpu: a check that matters on a CUDA GPU: make gpu-check runs these there (CUDA_ONLY ones skip elsewhere)')


def pytest_collection_modifyitems(items):
    """The modules marked first at the head, longest first, the rest in their usual order: pytest-xdist hands
    whole modules to its workers in this order, so the longest start at once and the short ones fill the end."""
    def order(item):
        first = item.get_closest_marker('first')
        return (0, -first.args[0]) if first else (1, 0)
    items.sort(key=order)


@pytest.fixture(scope='session', autouse=True)
def vendor_trees():
    for tree in [EDM, PRISTINE_EDM, EDM2, PRISTINE_EDM2, IDDPM, PRISTINE_IDDPM, NANO, PRISTINE_NANO]:
        if not os.path.isdir(tree):
            pytest.exit(f'{os.path.relpath(tree, ROOT)} is missing: run `make test`, which builds vendor/ first', returncode=1)


def edm_zip(top, resolution):
    """40 synthetic images of 10 classes at this resolution, written into top/data.zip by EDM's own
    dataset_tool.py (its real zip format, make data-cifar10's, which EDM2 reads too)."""
    write_folder(top / 'images', count=40, resolution=resolution)
    run_in(EDM, ['dataset_tool.py', f'--source={top / "images"}', f'--dest={top / "data.zip"}'])
    return top / 'data.zip'


@pytest.fixture(scope='session')
def edm_dataset(tmp_path_factory):
    """A 16x16, 10-class synthetic dataset in EDM's zip format."""
    return edm_zip(tmp_path_factory.mktemp('edm-data'), 16)


@pytest.fixture(scope='session')
def edm2_dataset(tmp_path_factory):
    """An 8x8, 10-class synthetic dataset in EDM's zip format, for EDM2's tiny networks."""
    return edm_zip(tmp_path_factory.mktemp('edm2-data'), 8)
