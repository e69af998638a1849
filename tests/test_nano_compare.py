"""tools/figures/nano_compare.py end to end at a tiny budget: every method runs, and the table and figures appear;
what one nano.py run writes (its PNGs, metrics.json), and scoring it again, read from the comparison's runs."""

import json
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import ROOT, nano
from tools.figures.images import save_grid, tile, to_uint8, untile

# A tool end to end, each run paying the notebook's 1000-step sampler: `make smoke` runs this module, `make test`
# does not (nano.py's sampler, scores and resuming are tested in test_nano_cli.py).
pytestmark = pytest.mark.smoke


# Two methods at a tiny budget: 32 digits, 2 epochs of 2 steps, 2 samples; one seed. One comparison
# serves every test of this module (each nano.py run pays the 1000-step sampler), with the notebook's
# sampler only; `make smoke` runs all five methods with both samplers (make nano-compare at the same budget).
METHODS = ['shift', 'uclora']
COMPARE = ['--epochs', '2', '--batch-size', '16', '--train-digits', '32', '--samples', '2', '--seeds', '0', '--methods', *METHODS,
           '--clip-x0', 'none']


def compare(out, *extra):
    command = [sys.executable, '-m', 'tools.figures.nano_compare', *COMPARE, *extra, '--out', str(out)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp('nano-compare')
    result = compare(out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_comparison_writes_its_table_and_figures(compared):
    table = (compared / 'results.md').read_text()
    for label in ['scale-and-shift (fixed embedding)', 'UC-LoRA']:
        assert f'| {label} |' in table
    for label in ["scale-and-shift (notebook's embedding)", 'TimeLoRA, interpolation init', 'TimeLoRA, random init']:
        assert f'| {label} |' not in table, 'only the methods asked for'
    assert '--methods shift uclora`' in table, 'the command that made the table'
    assert '2 epochs = 4 optimizer steps' in table and '| real training digits (2 a draw, 5 draws' in table
    results = json.loads((compared / 'results.json').read_text())
    assert len(results['real_digit_floor']) == 5 and results['shift'][0]['epochs'] == 2 and results['uclora'][0]['optimizer_steps'] == 4
    assert 'omega_similarity_near' in results['uclora'][0] and 'omega_similarity_near' not in results['shift'][0]
    for png in ['compare.png', 'omega_similarity.png']:
        assert PIL.Image.open(compared / png).size[0] > 500
    assert 'clipped sampler' not in table and not (compared / 'uclora-seed0' / 'clip-x0').exists(), '--clip-x0 none'


def test_a_run_writes_denormalised_pngs_and_metrics(compared):
    run = compared / 'uclora-seed0'
    metrics = json.loads((run / 'metrics.json').read_text())
    assert metrics['optimizer_steps'] == 4 and metrics['images_seen'] == 64 and metrics['samples'] == 2
    assert len(metrics['class_shares']) == 10 and abs(sum(metrics['class_shares']) - 1) < 0.01
    assert metrics['classifier_test_accuracy'] > 0.9, 'the proxy FID classifier recognises real held-out digits'
    assert 'not Inception FID' in metrics['proxy_fid_note']
    grid = np.asarray(PIL.Image.open(run / 'samples.png'))
    assert grid.dtype == np.uint8 and grid.shape == (64, 2 * 64), 'the 2 digits in one row, drawn 2x, no empty place'
    samples = torch.load(run / 'samples.pt')['samples']
    drawn = grid[::2, ::2].reshape(32, 2, 32).transpose(1, 0, 2)
    assert np.array_equal(drawn, to_uint8(samples)[:, 0]), 'the 2 samples, de-normalised'
    assert PIL.Image.open(run / 'loss.png').size[0] > 100


def test_rescoring_reuses_the_samples(compared, tmp_path):
    run = tmp_path / 'shift'
    shutil.copytree(compared / 'shift-seed0', run)
    first = json.loads((run / 'metrics.json').read_text())
    again = nano('--cond', 'shift', '--epochs', 2, '--batch-size', 16, '--train-digits', 32, '--samples', 2, '--out', run,
                 '--classifier', compared / 'digit-classifier.pt')
    assert 'after epoch 2' in again.stdout and 'reusing the 2 samples' in again.stdout and 'sampled' not in again.stdout
    assert json.loads((run / 'metrics.json').read_text())['proxy_fid'] == first['proxy_fid']
    assert np.asarray(PIL.Image.open(run / 'samples-rescaled.png')).shape == (64, 2 * 64), 'two samples: no empty place beside them'
    assert 0 <= first['off_range_share'] <= 1 and 'proxy_fid_rescaled' in first


def test_the_sample_panels_are_the_first_digits_of_a_runs_grid(tmp_path):
    # compare.png re-tiles each run's samples.png (16 digits a row, drawn 2x) 8 a row; nothing else writes grids.
    digits = np.random.default_rng(0).integers(0, 256, (20, 32, 32), dtype=np.uint8)
    save_grid(digits, tmp_path / 'samples.png', columns=16, scale=2)
    grid = np.asarray(PIL.Image.open(tmp_path / 'samples.png'))
    assert grid.shape == (2 * 64, 16 * 64)
    first = untile(grid, 64, 64, 16)
    assert np.array_equal(first[:, ::2, ::2], digits[:16])
    panel = tile(first, 8)
    assert panel.shape == (2 * 64, 8 * 64) and np.array_equal(panel[64:, :64], first[8])


def test_finished_runs_are_reused_and_the_clipped_sampler_resamples_their_checkpoints(compared, tmp_path):
    # The clip-x0 run's samples are planted where nano.py keeps them (samples.pt, which it reuses only
    # for the same checkpoint, seed and sampler): this test pays no second 1000-step sampling. The
    # sampler itself is tested in test_nano_cli.py.
    out = tmp_path / 'compare'
    shutil.copytree(compared, out)
    run, clipped_run = out / 'shift-seed0', out / 'shift-seed0' / 'clip-x0'
    planted = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clipped_run.mkdir()
    torch.save(dict(epoch=2, seed=0, sampler='clip-x0', samples=planted, seconds=0.0, device='cpu'), clipped_run / 'samples.pt')
    result = compare(out, '--clip-x0', 'shift')
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('[vendor/dataflowr]$') == 1 and '--sampler clip-x0' in result.stdout, 'the notebook runs are reused'
    assert 'after epoch 2' in result.stdout and 'reusing the 2 samples (clip-x0 sampler, 1000 steps)' in result.stdout
    notebook, clipped = (json.loads((folder / 'metrics.json').read_text()) for folder in [run, clipped_run])
    assert (notebook['sampler'], clipped['sampler']) == ('notebook', 'clip-x0') and clipped['optimizer_steps'] == notebook['optimizer_steps']
    assert torch.equal(torch.load(run / 'checkpoint.pt', weights_only=False)['network']['conv_out.weight'],
                       torch.load(clipped_run / 'checkpoint.pt', weights_only=False)['network']['conv_out.weight']), 'the same network'
    drawn = np.asarray(PIL.Image.open(clipped_run / 'samples.png'))[::2, :2 * 64:2].reshape(32, 2, 32).transpose(1, 0, 2)
    assert np.array_equal(drawn, to_uint8(planted)[:, 0]), 'scored: the clip-x0 samples'
    table = (out / 'results.md').read_text()
    main, second = table.split("## The same checkpoints, clipped sampler (nano.py --sampler clip-x0: not the notebook's)")
    label = 'scale-and-shift (fixed embedding)'
    assert f'| {label} | {notebook["proxy_fid"]:.1f} ± 0.0 |' in main and '| UC-LoRA |' in main
    assert f'| {label} | {clipped["proxy_fid"]:.1f} ± 0.0 | {clipped["proxy_fid"]:.1f} | {clipped["proxy_kid"]:.1f} ± 0.0 |' in second
    assert '| UC-LoRA |' not in second, 'only the --clip-x0 methods'
    assert json.loads((out / 'results.json').read_text())['shift-clip-x0'][0]['sampler'] == 'clip-x0'
    assert PIL.Image.open(out / 'compare.png').size[0] > 500


def test_clip_x0_takes_all_none_or_methods(tmp_path):
    command = [sys.executable, '-m', 'tools.figures.nano_compare', '--clip-x0', 'none', 'uclora', '--out', str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and '--clip-x0: all, none, or method names' in result.stderr and 'Traceback' not in result.stderr
