"""Score every snapshot of a paper-row run with the paper's FID protocol, resumably, one record a snapshot.

    python -m tools.paper.score runs/edm-cifar10-uncond-with-lora [--evaluations=3] [--snapshots=all|last|KIMG,...]

The row drivers (tools.paper.edm, tools.paper.iddpm) call this after training; run it by hand to
score a folder again with other options, or a folder that holds a converted checkpoint.

The protocol (README, "Scoring"):
- Every snapshot of the run (EDM network-snapshot-*.pkl, improved-diffusion ema_0.9999_*.pt) is
  scored: the row's number of images (50,000) at the row's NFE, FID by EDM's fid.py against the
  row's reference statistics.
- EDM's tables report the minimum of three FID evaluations with different seeds: evaluation k
  generates seeds k*N .. (k+1)*N - 1. EDM rows do 3 by default, improved-diffusion rows 1 (its
  paper reports one; each costs 50,000 samples at 4,000 steps).
- Each snapshot's record, scores/<snapshot>.nfe<NFE>.<N>.json, holds every finished evaluation
  (seeds, FID, seconds), the minimum, the mean and the spread (max - min). It is written atomically
  after each evaluation; a finished evaluation is never redone.
- Generation resumes where it stopped. EDM: each seed's PNG depends on that seed only, so only the
  seeds without a complete PNG (one that ends with PNG's IEND chunk: a kill mid-write leaves a
  truncated one, which is deleted) are generated. improved-diffusion: image_sample.py --sample_dir
  writes each batch atomically and skips batches already written.
- Images are deleted once their FID is recorded (--keep-images keeps them), but for the first 1,000
  of the first evaluation: scores/<snapshot>...preview.npz, which the sample grids show.
- GPUS=N: generation runs on N processes (torchrun for EDM, mpiexec for improved-diffusion); fid.py
  runs in one.
- Smoke runs score with a stand-in detector (tools/fid_standin.py) against reference statistics of
  their own synthetic data, made with fid.py ref: the numbers check the plumbing only.
"""

import argparse
import glob
import json
import os
import shutil
import sys
import time

import numpy as np
import PIL.Image

from tools import ROOT
from tools.paper.rows import ROWS
from tools.paper.steps import number_in_name, run_step

SMOKE_IMAGES = 32 # images an evaluation of a smoke run (16x16 or 32x32, stand-in detector)
PREVIEW = 1000    # images of each snapshot's first evaluation kept for the sample grids
PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82' # the last 12 bytes of every complete PNG file
STANDIN = os.path.join(ROOT, 'tools', 'fid_standin.py')
DETECTORS = {'inception': "Inception-v3 (EDM's fid.py)", 'standin': 'stand-in random projection (smoke: plumbing only)'}


def snapshots(folder, upstream):
    """The run's snapshots, oldest first."""
    pattern = 'network-snapshot-*.pkl' if upstream == 'edm' else 'ema_0.9999_*.pt'
    return sorted(glob.glob(os.path.join(folder, pattern)), key=number_in_name)


def images_seen(snapshot, upstream, batch):
    """Training images behind a snapshot: EDM names it by kimg, improved-diffusion by optimiser step."""
    return number_in_name(snapshot) * (1000 if upstream == 'edm' else batch)


def select(paths, which):
    """--snapshots: 'all', 'last', or a comma list of the numbers in their names (kimg or steps)."""
    if which == 'all' or not paths:
        return paths
    if which == 'last':
        return paths[-1:]
    wanted = {int(number) for number in which.split(',')}
    return [path for path in paths if number_in_name(path) in wanted]


def seed_ranges(seeds):
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8', as EDM's generate.py --seeds reads lists."""
    parts, start = [], None
    for index, seed in enumerate(seeds):
        if start is None:
            start = seed
        if index + 1 == len(seeds) or seeds[index + 1] != seed + 1:
            parts.append(f'{start}' if start == seed else f'{start}-{seed}')
            start = None
    return ','.join(parts)


def is_complete_png(path):
    with open(path, 'rb') as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < len(PNG_END):
            return False
        f.seek(-len(PNG_END), os.SEEK_END)
        return f.read() == PNG_END


def missing_seeds(image_dir, seeds):
    """The seeds of `seeds` without a complete PNG in image_dir (generate.py --subdirs layout);
    truncated PNGs, left by a kill mid-write, are deleted."""
    done = set()
    for path in glob.glob(os.path.join(image_dir, '*', '*.png')):
        if is_complete_png(path):
            done.add(number_in_name(path))
        else:
            print(f'{os.path.relpath(path, ROOT)}: incomplete (killed while written?); generating it again')
            os.remove(path)
    return [seed for seed in seeds if seed not in done]


def write_json(path, data):
    """Write atomically: a kill leaves the old record or the new one, never half of one."""
    with open(path + '.partial', 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(path + '.partial', path)


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def best(records):
    """The snapshot a row reports: the lowest FID (each snapshot's minimum over its evaluations); of
    equal ones, the later."""
    return min(records, key=lambda record: (record['fid_min'], -record['images_seen']))


def summarise(record):
    """The record's minimum, mean and spread over its finished evaluations."""
    fids = [e['fid'] for e in record['evaluations']]
    record.update(fid_min=min(fids), fid_mean=float(np.mean(fids)), fid_spread=max(fids) - min(fids), fid_count=len(fids))
    return record

#----------------------------------------------------------------------------
# Generation, one evaluation's images; both resume.

def edm_generate(snapshot, image_dir, seeds, protocol, launcher, class_label=None):
    """EDM's generate.py with the Heun sampler at the protocol's steps, for the seeds still missing
    (class_label: generate.py --class; default: a random class a seed, as generate.py draws it)."""
    missing = missing_seeds(image_dir, seeds)
    if not missing:
        return
    if len(missing) < len(seeds):
        print(f'{os.path.relpath(image_dir, ROOT)}: {len(seeds) - len(missing)} of {len(seeds)} images there; generating the other {len(missing)}')
    run_step(launcher + ['generate.py', f'--network={snapshot}', f'--outdir={image_dir}', f'--seeds={seed_ranges(missing)}',
                         '--subdirs', f'--steps={protocol["steps"]}', f'--batch={protocol["batch"]}']
             + ([f'--class={class_label}'] if class_label is not None else []), 'edm', dry_run=protocol['dry_run'])


def iddpm_generate(snapshot, image_dir, evaluation, protocol, launcher):
    """improved-diffusion's image_sample.py: batches written as they finish (resumed: the missing
    ones), seeded by the evaluation; then one PNG a sample for fid.py."""
    batches = os.path.join(image_dir, 'batches')
    run_step(launcher + ['scripts/image_sample.py', '--model_path', snapshot, *protocol['model_flags'], '--num_samples', protocol['images'],
                         '--batch_size', protocol['batch'], '--sample_dir', batches, '--seed', evaluation], 'improved-diffusion',
             dry_run=protocol['dry_run'], env=dict(OPENAI_LOGDIR=image_dir))
    if protocol['dry_run']:
        return
    index = 0
    for path in sorted(glob.glob(os.path.join(batches, 'batch_*.npz'))):
        for image in np.load(path)['arr_0']:
            folder = os.path.join(image_dir, f'{index - index % 1000:06d}')
            os.makedirs(folder, exist_ok=True)
            PIL.Image.fromarray(image).save(os.path.join(folder, f'{index:06d}.png'))
            index += 1

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

#----------------------------------------------------------------------------

def compute_fid(image_dir, protocol, dry_run=False):
    """fid.py calc in one process, whatever the processes that generated: the statistics of 50,000 images
    take a minute or two on one GPU, and torchrun would take fid.py's --num for its own --numa-binding
    (argparse abbreviations: "ambiguous option"), as mpiexec would start copies that do not share the work."""
    script = [STANDIN] if protocol['detector'] == 'standin' else ['fid.py']
    output = run_step([sys.executable] + script + ['calc', f'--images={image_dir}', f'--ref={protocol["ref"]}', f'--num={protocol["images"]}'],
                      'edm', dry_run=dry_run)
    return None if dry_run else float(output.strip().splitlines()[-1])


def reference_statistics(data, dest, launcher, dry_run=False):
    """fid.py ref of a dataset (smoke runs: with the stand-in; ImageNet64: Inception), written once and atomically."""
    if not os.path.exists(dest):
        script = [STANDIN] if 'standin' in os.path.basename(dest) else ['fid.py']
        run_step(launcher + script + ['ref', f'--data={data}', f'--dest={dest}.partial.npz'], 'edm', dry_run=dry_run)
        if not dry_run:
            os.replace(f'{dest}.partial.npz', dest)
    return dest


def score_snapshot(snapshot, run_folder, row, protocol, launcher, keep_images=False):
    """Every evaluation of one snapshot not yet recorded; returns the record. A dry run prints the
    commands of the first evaluation."""
    stem = os.path.basename(snapshot).rsplit('.', 1)[0]
    name = f'{stem}.nfe{protocol["nfe"]}.{protocol["images"]}'
    scores = os.path.join(run_folder, 'scores')
    if protocol['dry_run']:
        image_dir = os.path.join(scores, name, 'evaluation-0')
        generate = edm_generate if row.upstream == 'edm' else iddpm_generate
        generate(snapshot, image_dir, list(range(protocol['images'])) if row.upstream == 'edm' else 0, protocol, launcher)
        return compute_fid(image_dir, protocol, dry_run=True)
    os.makedirs(scores, exist_ok=True)
    record_path = os.path.join(scores, name + '.json')
    record = read_json(record_path) or dict(
        row=row.name, run=os.path.basename(run_folder), snapshot=os.path.basename(snapshot),
        images_seen=images_seen(snapshot, row.upstream, protocol['train_batch']), nfe=protocol['nfe'], sampler=protocol['sampler'],
        images=protocol['images'], detector=DETECTORS[protocol['detector']], reference=protocol['ref'], evaluations=[])
    for evaluation in range(protocol['evaluations']):
        seeds = list(range(evaluation * protocol['images'], (evaluation + 1) * protocol['images']))
        label = f'seeds {seed_ranges(seeds)}' if row.upstream == 'edm' else f'--seed {evaluation}'
        if any(e['seeds'] == label for e in record['evaluations']):
            continue
        print(f'\n{record["run"]}/{record["snapshot"]}: evaluation {evaluation + 1} of {protocol["evaluations"]} ({label})', flush=True)
        image_dir = os.path.join(scores, name, f'evaluation-{evaluation}')
        started = time.time()
        if row.upstream == 'edm':
            edm_generate(snapshot, image_dir, seeds, protocol, launcher)
        else:
            iddpm_generate(snapshot, image_dir, evaluation, protocol, launcher)
        generated = time.time()
        fid = compute_fid(image_dir, protocol)
        if evaluation == 0: # before the record: a recorded evaluation always has its preview
            keep_preview(image_dir, os.path.join(scores, name + '.preview.npz'))
        record['evaluations'].append(dict(seeds=label, fid=fid, generate_seconds=round(generated - started, 1),
                                          fid_seconds=round(time.time() - generated, 1), finished=time.strftime('%Y-%m-%d %H:%M:%S')))
        record['evaluations_planned'] = protocol['evaluations']
        write_json(record_path, summarise(record))
        print(f'FID {fid:g} ({label}); recorded in {os.path.relpath(record_path, ROOT)}', flush=True)
        if not keep_images:
            shutil.rmtree(image_dir)
            if not os.listdir(os.path.dirname(image_dir)):
                os.rmdir(os.path.dirname(image_dir))
    return summarise(record) if record['evaluations'] else record


def score_run(run_folder, row, protocol, launcher, which='all', keep_images=False):
    """Score the selected snapshots of a run, then draw its FID against training images."""
    from tools.paper.results import plot_run # matplotlib only when there is something to draw
    paths = select(snapshots(run_folder, row.upstream), which)
    if not paths:
        sys.exit(f'{os.path.relpath(run_folder, ROOT)}: no snapshot to score')
    records = [score_snapshot(path, run_folder, row, protocol, launcher, keep_images) for path in paths]
    png = plot_run(run_folder)
    reported = best(records)
    print(f'\n{os.path.basename(run_folder)}: best {reported["snapshot"]} FID {reported["fid_min"]:g} (min of {reported["fid_count"]}, spread '
          f'{reported["fid_spread"]:.3g}); last {records[-1]["snapshot"]} FID {records[-1]["fid_min"]:g}; {os.path.relpath(png, ROOT)}')
    return records


def row_of_folder(folder):
    """The paper row a run folder belongs to: its name is the row's, maybe with -smoke or -authors."""
    name = os.path.basename(os.path.normpath(folder))
    for suffix in ('-smoke', '-authors'):
        name = name[:-len(suffix)] if name.endswith(suffix) else name
    for row in ROWS:
        if row.name == name:
            return row
    sys.exit(f'{folder}: not the run folder of a paper row (runs/<upstream>-<dataset>-<variant>[-smoke])')


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
    row = row_of_folder(args.folder)
    if not select(snapshots(args.folder, row.upstream), args.snapshots):
        sys.exit(f'{args.folder}: no snapshot to score ({args.snapshots})')
    smoke = os.path.basename(os.path.normpath(args.folder)).endswith('-smoke')
    if row.upstream == 'edm':
        from tools.paper.edm import scoring_protocol, launcher
    else:
        from tools.paper.iddpm import scoring_protocol, launcher
    protocol = scoring_protocol(row, args.folder, smoke, args.evaluations, args.images)
    score_run(args.folder, row, protocol, launcher(args.gpus), args.snapshots, args.keep_images)


if __name__ == '__main__':
    main()
