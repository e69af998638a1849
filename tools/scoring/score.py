"""Score every snapshot of a paper-row run with the paper's FID protocol, resumably, one record a snapshot.

    python -m tools.scoring.score runs/edm-cifar10-uncond-with-lora [--evaluations=3] [--snapshots=all|last|KIMG,...]

The row drivers (tools.drivers.edm, tools.drivers.iddpm) call this after training; run it by hand to
score a folder again with other options, or a folder that holds a converted checkpoint.

The protocol is the README's ("Scoring"): every snapshot, the row's NFE and images, EDM's minimum
of several evaluations with other seeds, one record a snapshot written atomically after each
evaluation, generation resumed where it stopped. What differs by upstream (snapshot files,
launcher, sampler, seeds, number of evaluations) is in tools/scoring/upstreams.py; records and the
rule that picks a row's snapshot in tools/scoring/records.py.
"""

import argparse
import glob
import os
import re
import shutil
import sys
import time

import numpy as np
import PIL.Image

from tools import ROOT
from tools.data.dataset_check import shown
from tools.paper.rows import row_of_folder
from tools.scoring.digit_detector import detector_identity, kid, read_features
from tools.scoring.fid_steps import compute_fid, digit_features
from tools.scoring.records import DETECTORS, best, read_json, record_name, summarise, write_json
from tools.scoring.results import plot_run
from tools.scoring.upstreams import UPSTREAMS, select, snapshots
from tools.vendoring.run import working_in

PREVIEW = 1000    # images of each snapshot's first evaluation kept for the sample grids


def keep_preview(image_dir, path, count=PREVIEW):
    """The first images of an evaluation (and their labels where improved-diffusion wrote them, else -1),
    for the sample grids, which then need no generation of their own."""
    batches = sorted(glob.glob(os.path.join(image_dir, 'batches', 'batch_*.npz')))
    if batches:
        loaded = [np.load(batch) for batch in batches[:(count - 1) // len(np.load(batches[0])['arr_0']) + 1]]
        images = np.concatenate([batch['arr_0'] for batch in loaded])[:count]
        labels = np.concatenate([batch['arr_1'] if 'arr_1' in batch else np.full(len(batch['arr_0']), -1) for batch in loaded])[:count]
    else:
        paths = sorted(glob.glob(os.path.join(image_dir, '*', '*.png')))[:count]
        images = np.stack([np.asarray(PIL.Image.open(p).convert('RGB')) for p in paths])
        labels = np.full(len(paths), -1)
    with open(path + '.partial', 'wb') as f:
        np.savez(f, images=images, labels=labels)
    os.replace(path + '.partial', path)


def kid_of(image_dir, protocol, features_path):
    """KID (the digit detector's features) of the images against the reference dataset's: its mean and
    spread over 100 pairs of subsets of half the images each."""
    reference = read_features(digit_features(protocol['kid_data'], protocol['kid_ref']))
    features = read_features(digit_features(image_dir, features_path))
    mean, spread = kid(features, reference, subsets=100, subset_size=len(features) // 2)
    os.remove(features_path) # the images' features: only their KID is kept
    return dict(kid=mean, kid_std=spread)


def score_snapshot(snapshot, run_folder, row, protocol, launcher, keep_images=False):
    """Every evaluation of one snapshot not yet recorded; returns the record. A dry run prints the
    commands of the first evaluation."""
    upstream = UPSTREAMS[row.upstream]
    name = record_name(snapshot, protocol['nfe'], protocol['images'])
    scores = os.path.join(run_folder, 'scores')
    if protocol['dry_run']:
        image_dir = os.path.join(scores, name, 'evaluation-0')
        upstream.generate(snapshot, image_dir, 0, protocol, launcher)
        return compute_fid(image_dir, protocol, dry_run=True)
    os.makedirs(scores, exist_ok=True)
    record_path = os.path.join(scores, name + '.json')
    record = read_json(record_path) or dict(
        row=row.name, run=os.path.basename(run_folder), snapshot=os.path.basename(snapshot),
        images_seen=upstream.images_seen(snapshot, protocol['train_batch']), nfe=protocol['nfe'], sampler=protocol['sampler'],
        images=protocol['images'], detector=DETECTORS[protocol['detector']], reference=protocol['ref'], evaluations=[],
        **({'detector_sha256': detector_identity()['sha256']} if protocol['detector'] == 'digits' else {}))
    for evaluation in range(protocol['evaluations']):
        label = upstream.evaluation_label(evaluation, protocol)
        if any(e['seeds'] == label for e in record['evaluations']):
            continue
        print(f'\n{record["run"]}/{record["snapshot"]}: evaluation {evaluation + 1} of {protocol["evaluations"]} ({label})', flush=True)
        image_dir = os.path.join(scores, name, f'evaluation-{evaluation}')
        started = time.time()
        upstream.generate(snapshot, image_dir, evaluation, protocol, launcher)
        generated = time.time()
        fid = compute_fid(image_dir, protocol)
        kid = kid_of(image_dir, protocol, os.path.join(scores, f'{name}.features-{evaluation}.npz')) if 'kid_ref' in protocol else {}
        if evaluation == 0: # before the record: a recorded evaluation always has its preview
            keep_preview(image_dir, os.path.join(scores, name + '.preview.npz'))
        record['evaluations'].append(dict(seeds=label, fid=fid, **kid, generate_seconds=round(generated - started, 1),
                                          fid_seconds=round(time.time() - generated, 1), finished=time.strftime('%Y-%m-%d %H:%M:%S')))
        record['evaluations_planned'] = protocol['evaluations']
        write_json(record_path, summarise(record))
        print(f'FID {fid:g}' + (f', KID {kid["kid"]:.4g}' if kid else '') + f' ({label}); recorded in {os.path.relpath(record_path, ROOT)}', flush=True)
        if not keep_images:
            shutil.rmtree(image_dir)
            if not os.listdir(os.path.dirname(image_dir)):
                os.rmdir(os.path.dirname(image_dir))
    return summarise(record) if record['evaluations'] else record


def score_run(run_folder, row, protocol, launcher, which='all', keep_images=False):
    """Score the selected snapshots of a run, then draw its FID against training images."""
    upstream = UPSTREAMS[row.upstream]
    upstream.prepare_snapshots(run_folder, which)
    paths = select(snapshots(run_folder, upstream), which, upstream)
    if not paths:
        sys.exit(f'{os.path.relpath(run_folder, ROOT)}: no snapshot to score')
    records = [score_snapshot(path, run_folder, row, protocol, launcher, keep_images) for path in paths]
    png = plot_run(run_folder)
    reported = best(records)
    print(f'\n{os.path.basename(run_folder)}: best {reported["snapshot"]} FID {reported["fid_min"]:g} (min of {reported["fid_count"]}, spread '
          f'{reported["fid_spread"]:.3g}); last {records[-1]["snapshot"]} FID {records[-1]["fid_min"]:g}; {os.path.relpath(png, ROOT)}')
    return records


def score_folder(folder, gpus=1, which='all', evaluations=None, images=None, keep_images=False):
    """Score a run folder by the protocol of the row its name gives (`make score`, and the authors' checkpoints)."""
    folder = os.path.abspath(folder) # generation runs in vendor/<tree>, where a relative path means something else
    try:
        row, smoke, _ = row_of_folder(folder)
    except KeyError as error:
        sys.exit(error.args[0])
    upstream = UPSTREAMS[row.upstream]
    with working_in(folder, f'scoring {shown(folder)}'): # its own training run may be scoring it
        if not select(upstream.scorable(folder), which, upstream):
            sys.exit(f'{folder}: no snapshot to score ({which})')
        protocol = upstream.protocol(row, folder, smoke, evaluations, images)
        return score_run(folder, row, protocol, upstream.launcher(gpus), which, keep_images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('folder', help='a paper-row run folder, e.g. runs/edm-cifar10-uncond-with-lora')
    parser.add_argument('--evaluations', type=int, help='FID evaluations a snapshot (different seeds; the minimum is reported)')
    parser.add_argument('--snapshots', default='all', help="'all', 'last' or a comma list of kimg (EDM) / steps (improved-diffusion)")
    parser.add_argument('--images', type=int, help='images an evaluation (default: the row\'s, 50,000)')
    parser.add_argument('--gpus', type=int, default=1, help='processes (GPUs) that share generation and FID')
    parser.add_argument('--keep-images', action='store_true', help='keep the generated images once scored')
    args = parser.parse_args()
    if not os.path.isdir(args.folder):
        parser.error(f'{args.folder} is not a folder')
    if args.snapshots not in ('all', 'last') and not re.fullmatch(r'\d+(,\d+)*', args.snapshots):
        parser.error(f"--snapshots={args.snapshots}: 'all', 'last' or a comma list of numbers")
    score_folder(args.folder, args.gpus, args.snapshots, args.evaluations, args.images, args.keep_images)


if __name__ == '__main__':
    main()
