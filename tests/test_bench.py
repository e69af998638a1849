"""make bench (tools/bench/networks.py) at tiny size: every upstream's networks built, timed and tabled."""

import json

import pytest

from conftest import tool

NETWORKS = ['edm-cifar10-uncond', 'iddpm-cifar10-cond', 'nano-mnist']


@pytest.mark.smoke # every network of three upstreams built and timed: end to end (make smoke), not make test
def test_the_tiny_benchmark_tables_every_variant_against_its_baseline(tmp_path):
    result = tool('bench.networks', '--tiny', '--networks', ','.join(NETWORKS), '--out', tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / 'tiny.json').read_text())
    assert report['failed'] == [] and report['tiny'] and len(report['commit']) >= 7
    variants = {(line['network'], line['variant']) for line in report['lines']}
    assert variants == {('edm-cifar10-uncond', v) for v in ['baseline', 'only-lora', 'with-lora', 'adaln']} | \
        {('iddpm-cifar10-cond', v) for v in ['baseline', 'with-lora']} | {('nano-mnist', v) for v in ['shift', 'timelora-interp', 'uclora']}
    for line in report['lines']:
        baseline = line['variant'] in ('baseline', 'shift')
        for what in ['train', 'sample']:
            assert line[f'{what}_ms'] > 0
            assert (line[f'{what}_ratio'] == 1.0) if baseline else (0 < line[f'{what}_ratio'] < 100)
        assert line['memory_bytes'] > 0
        if line['variant'] in ('with-lora', 'uclora', 'timelora-interp'): # LoRA adds parameters to its baseline's
            assert line['parameter_ratio'] > 1
    table = (tmp_path / 'tiny.md').read_text()
    assert table.count('\n| ') == len(report['lines']) + 1, 'a header and a line per variant'
    assert 'nano diffusion MNIST | fp32 | uclora' in table


def test_the_layer_benchmark_times_every_lora_layer_shape_of_nano_diffusion(tmp_path):
    result = tool('bench.layers', '--batch', 2, '--repeats', 1, '--out', tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / 'layers-cpu.md').read_text()
    rows = [line for line in table.splitlines() if line.startswith('| ') and 'x' in line.split('|')[2]]
    # MyTinyUNet's 21 LoRA layers have 16 distinct shapes (in, out, size), from 1 -> 10 at 32x32 down to 4x4.
    assert len(rows) == 16 and rows[0].startswith('| 1 -> 10 | 32x32 |') and any('| 4x4 |' in row for row in rows)
    assert 'of 16 layer shapes' in table


def test_an_unknown_network_is_a_usage_error(tmp_path):
    result = tool('bench.networks', '--networks', 'edm-cifar100', '--out', tmp_path)
    assert result.returncode == 2
    assert 'unknown network edm-cifar100; choose from edm-cifar10-uncond' in result.stderr
    assert 'Traceback' not in result.stderr
