"""Scoring every snapshot (tools/scoring/score.py) and `make results` (tools/scoring/results.py) on two
tiny EDM snapshots, with the stand-in detector (tools/scoring/fid_standin.py) that smoke runs use."""

import glob
import json
import os
import pickle
import re
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import EDM
from tiny import EDM_DDPMPP
from tools import ROOT
from tools.scoring.fid_standin import standin_weights
from tools.scoring import records, results, score, upstreams
from tools.paper.rows import find

pytestmark = pytest.mark.first(57) # one of the longest modules, started early (seconds measured by --durations)

ROW = find('edm', 'cifar10-uncond', 'with-lora')


def standin_features(paths):
    """The stand-in's features of PNG files, computed here, without fid.py."""
    images = np.stack([np.asarray(PIL.Image.open(path).convert('RGB')).transpose(2, 0, 1) for path in paths])
    flat = images.reshape(len(paths), -1).astype(np.float64) / 255
    return np.tanh(flat @ standin_weights(flat.shape[1]))


def statistics(features):
    """Mean and covariance of features [N, D], as FID takes them."""
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu_a, s_a, mu_b, s_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), through symmetric eigendecompositions:
    computed here, independently of fid.py's scipy.linalg.sqrtm."""
    values, vectors = np.linalg.eigh(s_a)
    root_a = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    return np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A smoke-run folder of the with-LoRA row with two snapshots (kimg 0 and 1) and stand-in reference statistics."""
    runs = tmp_path_factory.mktemp('runs')
    folder = runs / f'{ROW.name}-smoke'
    folder.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(EDM)
        from training import networks
        for kimg in (0, 1):
            torch.manual_seed(kimg)
            net = networks.EDMPrecond(**dict(EDM_DDPMPP, label_dim=0)).eval()
            with torch.no_grad(): # the zero-initialised output layers as training leaves them: samples differ
                for name, param in net.named_parameters():
                    if name.endswith(('aux_conv.weight', 'proj.weight')):
                        param.normal_(0, 0.3)
            with open(folder / f'network-snapshot-{kimg:06d}.pkl', 'wb') as f:
                pickle.dump(dict(ema=net), f)
    real = np.random.default_rng(0).integers(0, 256, size=(40, 3 * 16 * 16)).astype(np.float64) / 255
    features = np.tanh(real @ standin_weights(real.shape[1]))
    np.savez(folder / 'fid-ref-standin.npz', mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    return runs, folder


def protocol(folder, evaluations):
    return dict(steps=2, nfe=3, sampler="EDM's Heun sampler, 2 steps", batch=8, images=8, evaluations=evaluations,
                ref=str(folder / 'fid-ref-standin.npz'), detector='standin', train_batch=512, dry_run=False)


@pytest.fixture(scope='module')
def scored(run):
    """Both snapshots scored once (images kept), then the last one again with a second evaluation."""
    runs, folder = run
    first = score.score_run(str(folder), ROW, protocol(folder, 1), [sys.executable], 'all', keep_images=True)
    second = score.score_run(str(folder), ROW, protocol(folder, 2), [sys.executable], 'last')
    return first, second


def test_every_snapshot_gets_a_record_with_the_fid_of_its_images(run, scored):
    runs, folder = run
    first, _ = scored
    assert [record['snapshot'] for record in first] == ['network-snapshot-000000.pkl', 'network-snapshot-000001.pkl']
    ref = np.load(folder / 'fid-ref-standin.npz')
    for record in first:
        assert record['images_seen'] == 1000 * int(record['snapshot'][-10:-4]) and record['nfe'] == 3 and record['images'] == 8
        images = sorted(glob.glob(str(folder / 'scores' / f'{record["snapshot"][:-4]}.nfe3.8' / 'evaluation-0' / '*' / '*.png')))
        assert [os.path.basename(path) for path in images] == [f'{seed:06d}.png' for seed in range(8)], 'seeds 0-7'
        expected = frechet_distance(*statistics(standin_features(images)), ref['mu'], ref['sigma'])
        assert record['evaluations'][0]['fid'] == pytest.approx(expected, rel=1e-4)
        assert record['evaluations'][0]['seeds'] == 'seeds 0-7'
    assert first[0]['fid_min'] != first[1]['fid_min'], 'two different networks'


def test_a_second_evaluation_uses_other_seeds_and_the_minimum_is_reported(run, scored):
    runs, folder = run
    first, second = scored
    assert len(second) == 1 and second[0]['snapshot'] == 'network-snapshot-000001.pkl'
    evaluations = second[0]['evaluations']
    assert [e['seeds'] for e in evaluations] == ['seeds 0-7', 'seeds 8-15']
    assert evaluations[0] == first[1]['evaluations'][0], 'the finished evaluation is kept, not redone'
    fids = [e['fid'] for e in evaluations]
    assert fids[0] != fids[1]
    assert second[0]['fid_min'] == min(fids) and second[0]['fid_spread'] == pytest.approx(max(fids) - min(fids))
    assert not os.path.exists(folder / 'scores' / 'network-snapshot-000001.nfe3.8' / 'evaluation-1'), 'images deleted once scored'
    on_disk = json.loads((folder / 'scores' / 'network-snapshot-000001.nfe3.8.json').read_text())
    assert on_disk['fid_min'] == second[0]['fid_min'] and on_disk['evaluations_planned'] == 2


def test_a_rerun_does_nothing(run, scored, capsys):
    runs, folder = run
    capsys.readouterr()
    again = score.score_run(str(folder), ROW, protocol(folder, 2), [sys.executable], 'last')
    printed = capsys.readouterr().out
    assert '[vendor/' not in printed, 'no command run'
    assert again == scored[1]


def test_an_interrupted_generation_resumes_to_the_same_images(run, scored, tmp_path):
    runs, folder = run
    kept = folder / 'scores' / 'network-snapshot-000000.nfe3.8' / 'evaluation-0'
    snapshot = str(folder / 'network-snapshot-000000.pkl')
    killer = [sys.executable, os.path.join(ROOT, 'tools', 'checks', 'kill_midwrite.py'), '000005', '--']
    with pytest.raises(SystemExit): # the step fails: killed while writing seed 5's PNG
        upstreams.EDM.generate_seeds(snapshot, str(tmp_path), list(range(8)), protocol(folder, 1), killer)
    truncated = tmp_path / '000000' / '000005.png'
    assert truncated.exists() and not upstreams.is_complete_png(truncated), 'the kill left a truncated PNG'
    assert upstreams.missing_seeds(str(tmp_path), list(range(8))) == [5, 6, 7] and not truncated.exists(), 'taken as missing and deleted'
    upstreams.EDM.generate_seeds(snapshot, str(tmp_path), list(range(8)), protocol(folder, 1), [sys.executable])
    for seed in range(8):
        path = f'000000/{seed:06d}.png'
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / path)), np.asarray(PIL.Image.open(kept / path))), path


def test_results_put_the_best_snapshot_beside_the_paper(run, scored, tmp_path):
    runs, folder = run
    lines = results.collect(str(runs), smoke=True, count_params=False)
    ours = [line for line in lines if line['row'] == ROW.name]
    assert {line['table'] for line in ours} == {'Table 1', 'Table 2'}
    best = min([scored[0][0], scored[1][0]], key=lambda record: record['fid_min']) # no tie: two different networks
    for line in ours:
        assert line['fid_paper'] == 1.96 and line['fid'] == round(best['fid_min'], 4) and line['snapshot'] == best['snapshot']
        assert line['fid_last'] == round(scored[1][0]['fid_min'], 4) and line['nfe'] == 3
    others = [line for line in lines if line['row'] != ROW.name]
    assert others and all(line['fid'] == '' and line['snapshot'] == '' for line in others), 'no run: empty, never the paper\'s'
    assert any(line['fid_paper'] == 1.97 for line in others), "the paper's column is there for rows without a run"
    text = results.markdown(lines, smoke=True)
    assert '## Table 1' in text and '## Table 2' in text and 'stand-in detector' in text
    assert os.path.exists(folder / 'fid-vs-images.png')
    picture = results.plot_table(lines, 'Table 1', True, str(tmp_path))
    assert np.asarray(PIL.Image.open(picture).convert('L')).std() > 10


def test_seed_lists_as_generate_py_reads_them():
    assert upstreams.seed_ranges([0, 1, 2, 5, 7, 8]) == '0-2,5,7-8'
    assert upstreams.seed_ranges([3]) == '3'


def test_snapshot_selection(tmp_path):
    paths = [str(tmp_path / f'network-snapshot-{kimg:06d}.pkl') for kimg in (0, 50, 100)]
    assert upstreams.select(paths, 'last', upstreams.EDM) == paths[-1:]
    assert upstreams.select(paths, '0,100', upstreams.EDM) == [paths[0], paths[2]]
    assert upstreams.select(paths, 'all', upstreams.EDM) == paths


def test_edm2_snapshots_are_its_post_hoc_ema_networks_by_kimg(tmp_path):
    """EDM2's scored snapshots are reconstruct_phema.py's phema-<kimg>-<std>.pkl, ordered and selected by kimg (not by
    the std, the last number of the name), each standing for kimg rounded to EDM2's multiples of 1,024 images."""
    edm2 = upstreams.EDM2
    for kimg in (8, 16, 24, 100):
        (tmp_path / edm2.snapshot_name(kimg)).write_bytes(b'')
        (tmp_path / f'network-snapshot-{kimg:07d}-0.050.pkl').write_bytes(b'') # training's: not scored
    paths = upstreams.snapshots(str(tmp_path), edm2)
    assert [os.path.basename(path) for path in paths] == [f'phema-{kimg:07d}-0.075.pkl' for kimg in (8, 16, 24, 100)]
    assert upstreams.select(paths, '16,100', edm2) == [paths[1], paths[3]]
    assert [edm2.images_seen(path, None) for path in paths] == [8 * 1024, 16 * 1024, 24 * 1024, 98 * 1024] # 100 kimg: 100,352 images, the multiple of 1,024 it names


def test_edm2_rebuilds_the_post_hoc_ema_of_the_selected_training_snapshots_only(tmp_path, capsys):
    """Each post-hoc EMA network reads every snapshot up to its kimg: --snapshots=last must not rebuild the others."""
    edm2 = upstreams.EDM2
    for kimg in (0, 8, 16, 24):
        for std in ('0.050', '0.100'): # training's two EMA profiles a snapshot
            (tmp_path / f'network-snapshot-{kimg:07d}-{std}.pkl').write_bytes(b'')
    (tmp_path / edm2.snapshot_name(8)).write_bytes(b'') # made already
    rebuilt = lambda: re.findall(r'--outkimg=(\d+)', capsys.readouterr().out)
    edm2.prepare_snapshots(str(tmp_path), 'last', dry_run=True)
    assert rebuilt() == ['24']
    edm2.prepare_snapshots(str(tmp_path), 'all', dry_run=True)
    assert rebuilt() == ['16', '24'], 'kimg 8 is there; time 0 is copied, not reconstructed'
    edm2.prepare_snapshots(str(tmp_path), '0,16', dry_run=True)
    assert rebuilt() == ['16']


def test_edm2_scores_the_untrained_network_at_time_0(tmp_path):
    """reconstruct_phema.py refuses --outkimg=0: the point at 0 kimg is training's own snapshot of the initial network."""
    edm2 = upstreams.EDM2
    (tmp_path / 'network-snapshot-0000000-0.050.pkl').write_bytes(b'initial network')
    (tmp_path / 'network-snapshot-0000000-0.100.pkl').write_bytes(b'initial network')
    (tmp_path / 'network-snapshot-0000008-0.050.pkl').write_bytes(b'trained')
    assert [edm2.snapshot_number(path) for path in edm2.scorable(str(tmp_path))] == [0, 8]
    edm2.prepare_snapshots(str(tmp_path), '0')
    assert (tmp_path / 'phema-0000000-0.075.pkl').read_bytes() == b'initial network'
    assert not list(tmp_path.glob('*.partial'))
    assert edm2.images_seen(str(tmp_path / 'phema-0000000-0.075.pkl'), None) == 0


def test_differences_within_the_spread_are_marked():
    line = lambda row, fid, spread, paper: dict(row=row, upstream='edm', dataset='CIFAR-10 uncond', source='trained here',
                                                fid=fid, spread=spread, fid_paper=paper)
    lines = [line('edm-cifar10-uncond-baseline', 2.0, 0.05, 1.97), line('edm-cifar10-uncond-with-lora', 1.98, 0.02, 1.96),
             line('edm-cifar10-uncond-only-lora', 1.8, 0.01, 1.75), line('edm-cifar10-uncond-bases-9', '', '', 1.99)]
    results.mark_differences(lines)
    assert lines[1]['vs_baseline'] == '-0.02 ~' and lines[1]['paper_vs_baseline'] == '-0.01 ~', 'within the larger spread, 0.05'
    assert lines[2]['vs_baseline'] == '-0.2' and lines[2]['paper_vs_baseline'] == '-0.22', 'beyond it'
    assert lines[3]['vs_baseline'] == '' and lines[3]['paper_vs_baseline'] == '+0.02 ~', "no run: the paper's difference against our spread"
    assert lines[0]['vs_baseline'] == ''


def test_runs_scored_with_two_protocols_get_a_line_each(tmp_path):
    # FFHQ scored with EDM's 50,000 images and with the authors' 70,000: snapshots compare within a protocol only.
    row = find('edm', 'ffhq64', 'with-lora')
    scores = tmp_path / f'{row.name}-smoke' / 'scores'
    scores.mkdir(parents=True)
    for kimg, images, fids in [(100, 50000, [2.5, 2.6]), (200, 50000, [2.4, 2.45]), (100, 70000, [2.3]), (200, 70000, [2.35])]:
        record = dict(row=row.name, snapshot=f'network-snapshot-{kimg:06d}.pkl', images_seen=kimg * 1000, nfe=79, images=images,
                      detector='d', evaluations=[dict(seeds=f'seeds {i}', fid=fid) for i, fid in enumerate(fids)], evaluations_planned=len(fids))
        (scores / f'network-snapshot-{kimg:06d}.nfe79.{images}.json').write_text(json.dumps(records.summarise(record)))
    lines = [line for line in results.collect(str(tmp_path), smoke=True, count_params=False) if line['row'] == row.name]
    assert sorted((line['images'], line['fid'], line['snapshot']) for line in lines) == [
        (50000, 2.4, 'network-snapshot-000200.pkl'), (70000, 2.3, 'network-snapshot-000100.pkl')]
    assert os.path.exists(results.plot_run(str(scores.parent)))


def test_fid_axes_do_not_magnify_differences_in_the_fourth_decimal():
    plt = results.pyplot()
    fig, ax = plt.subplots()
    values = [309.2700, 309.2740, 309.2720]
    ax.plot([0, 1, 2], values)
    results.fid_axis(ax, values)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    assert high - low >= 0.01 * 309.274 and low <= 309.27 and high >= 309.274
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert all(len(label.split('.')[-1]) <= 1 for label in labels if '.' in label), labels
    assert ax.yaxis.get_offset_text().get_text() == ''
    assert ax.get_yscale() == 'linear'
    plt.close(fig)


def test_fid_axes_of_an_untrained_start_are_logarithmic():
    """262 untrained, then 10, 5 and 4: on a linear axis the trained points could not be told apart."""
    plt = results.pyplot()
    fig, ax = plt.subplots()
    values = [262.08, 10.38, 5.32, 3.75]
    ax.plot([0, 8, 16, 24], values)
    results.fid_axis(ax, values)
    fig.canvas.draw()
    assert ax.get_yscale() == 'log'
    low, high = ax.get_ylim()
    assert low <= 3.75 and high >= 262.08
    plt.close(fig)
