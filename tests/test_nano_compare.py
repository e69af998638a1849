"""tools/paper/nano_compare.py end to end at a tiny budget: every method runs, and the table and figures appear."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image

from conftest import ROOT
from tools.images import save_grid, tile, untile


def test_comparison_writes_its_table_and_figures_and_reuses_finished_runs(tmp_path):
    command = [sys.executable, '-m', 'tools.paper.nano_compare', '--epochs', '2', '--batch-size', '16',
               '--train-digits', '32', '--samples', '2', '--seeds', '0', '--out', str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stdout + first.stderr
    table = (tmp_path / 'results.md').read_text()
    for label in ['scale-and-shift (fixed embedding)', "scale-and-shift (notebook's embedding)", 'TimeLoRA, interpolation init',
                  'TimeLoRA, random init', 'UC-LoRA']:
        assert f'| {label} |' in table
    assert '2 epochs = 4 optimizer steps' in table and '| real training digits (2 a draw, 5 draws' in table
    results = json.loads((tmp_path / 'results.json').read_text())
    assert len(results['real_digit_floor']) == 5 and results['shift'][0]['epochs'] == 2 and results['uclora'][0]['optimizer_steps'] == 4
    assert 'omega_similarity_near' in results['timelora-random'][0] and 'omega_similarity_near' not in results['shift'][0]
    for png in ['compare.png', 'omega_similarity.png']:
        assert PIL.Image.open(tmp_path / png).size[0] > 500
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and 'nano.py' not in again.stdout, 'finished runs are reused, not run again'


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
