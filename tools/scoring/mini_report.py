"""`make mini`'s tables: each mini group's runs beside the paper's numbers, and whether each of the
paper's comparisons holds at this scale.

    python -m tools.scoring.mini_report [--runs runs] [--out runs/mini]

For every mini row (tools.paper.rows.MINI_ROWS): its runs (runs/<row>-seed<N>/), each reported at its
best snapshot as every row is (tools.scoring.records.best), FID and KID by the digit detector; the
mean and the spread (sample standard deviation) over seeds; the FID of the first and the last snapshot (a run
that learns falls); its parameter count and ratio to the group's baseline beside the paper's ratio.
Per comparison the paper makes (with LoRA vs baseline, only LoRA vs baseline, LoRA vs adaLN): the
paper's FID difference, ours, whether the directions agree, and whether ours exceeds the seeds'
spread. Beside them the real-vs-real floor: as many held-out digits as a run has samples, scored as they are.
Writes <out>/mini.md and fid-vs-images-<group>.png; prints the tables.
"""

import argparse
import json
import os

import numpy as np

from tools import ROOT
from tools.data.mini_digits import HELD_OUT_FOLDER
from tools.paper.rows import MINI_FID_IMAGES, MINI_GROUPS, MINI_ROWS, mini_group, run_folder, seed_of_folder
from tools.scoring.digit_detector import detector_identity, kid, read_features
from tools.scoring.fid_steps import compute_fid, digit_features
from tools.scoring.records import load_records, reported
from tools.scoring.results import images_axis, params_of, pyplot
from tools.scoring.upstreams import UPSTREAMS

# The paper's comparisons: (variant A, variant B), reported as FID(A) - FID(B) by the paper and by the mini runs.
COMPARISONS = [('with-lora', 'baseline'), ('only-lora', 'baseline'), ('with-lora', 'adaln'), ('only-lora', 'adaln')]


def seed_runs(row, runs):
    """{seed: records} of a mini row's runs that have scores."""
    found = {}
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        seed = seed_of_folder(name)
        if seed is not None and name == os.path.basename(run_folder(runs, row, seed=seed)):
            records = load_records(os.path.join(runs, name))
            if records:
                found[seed] = records
    return found


def summary(row, runs):
    """A row's numbers over its seeds (None where it has no run)."""
    found = seed_runs(row, runs)
    best = {seed: reported(records)[0] for seed, records in found.items()}
    kids = [np.mean([e['kid'] for e in record['evaluations']]) for record in best.values() if 'kid' in record['evaluations'][0]]
    fids = [record['fid_min'] for record in best.values()]
    return dict(row=row, seeds=sorted(found), fids=fids, kids=kids,
                fid=np.mean(fids) if fids else None, fid_std=np.std(fids, ddof=1) if len(fids) > 1 else None,
                kid=np.mean(kids) if kids else None, kid_std=np.std(kids, ddof=1) if len(kids) > 1 else None,
                first=np.mean([records[0]['fid_min'] for records in found.values()]) if found else None,
                last=np.mean([records[-1]['fid_min'] for records in found.values()]) if found else None,
                curves={seed: records for seed, records in found.items()})


def floor(out, protocol):
    """The real-vs-real floor at the runs' sample count: as many held-out digits as a run has samples (picked
    as fid.py calc --num picks them), scored as samples are (FID through fid.py, KID), computed once into
    <out>/floor.json."""
    path = os.path.join(out, 'floor.json')
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get('images') == protocol['images']: # else: a floor of another count (older projects scored all 1,000)
            return saved
    fid = compute_fid(HELD_OUT_FOLDER, protocol)
    reference = read_features(digit_features(protocol['kid_data'], protocol['kid_ref']))
    held_out = read_features(digit_features(HELD_OUT_FOLDER, os.path.join(out, f'held-out-features-{protocol["images"]}.npz'), num=protocol['images']))
    mean, spread = kid(held_out, reference, subsets=100, subset_size=len(held_out) // 2)
    result = dict(fid=fid, kid=mean, kid_std=spread, images=len(held_out), detector=detector_identity())
    with open(path + '.partial', 'w') as f: # whole or not at all: a kill never leaves a floor to misread
        json.dump(result, f, indent=2)
    os.replace(path + '.partial', path)
    return result


def number(value, spread=None, digits=2):
    if value is None:
        return ''
    return f'{value:.{digits}f}' + (f' ± {spread:.{digits}f}' if spread is not None else '')


def group_table(group, summaries):
    baseline = next((s for s in summaries if s['row'].variant == 'baseline'), None)
    base_params, base_paper = (params_of(baseline['row']), baseline['row'].scales.paper_params) if baseline else (None, None)
    lines = [f'| variant | seeds | FID (mean ± sd) | KID | FID first → last snapshot | parameters (ratio) | paper: ratio | paper FID |',
             '|---|---|---|---|---|---|---|---|']
    for s in summaries:
        row = s['row']
        ours = params_of(row)
        ratio = f' ({ours / base_params:.3f})' if base_params and ours != '' else ''
        paper = row.scales.paper_params
        paper_ratio = f'{paper / base_paper:.3f}' if paper and base_paper else ''
        first_last = f'{s["first"]:.1f} → {s["last"]:.1f}' if s['first'] is not None else ''
        lines.append(f'| {row.variant} | {len(s["seeds"]) or ""} | {number(s["fid"], s["fid_std"] if len(s["seeds"]) > 1 else None)} | '
                     f'{number(s["kid"], s["kid_std"] if len(s["seeds"]) > 1 else None, 3)} | {first_last} | {ours:,}{ratio} | {paper_ratio} | '
                     f'{row.scales.paper_fid if row.scales.paper_fid is not None else ""} |')
    return lines


def comparison_lines(group, summaries):
    by_variant = {s['row'].variant: s for s in summaries}
    lines = []
    for a, b in COMPARISONS:
        if a not in by_variant or b not in by_variant:
            continue
        A, B = by_variant[a], by_variant[b]
        paper_a, paper_b = A['row'].scales.paper_fid, B['row'].scales.paper_fid
        paper = paper_a - paper_b if paper_a is not None and paper_b is not None else None
        if A['fid'] is None or B['fid'] is None:
            lines.append(f'| {a} vs {b} | {number(paper)} | no runs | | |')
            continue
        ours = A['fid'] - B['fid']
        agrees = '' if paper is None or paper == 0 else ('yes' if np.sign(ours) == np.sign(paper) else 'no')
        seeds = min(len(A['seeds']), len(B['seeds']))
        beyond = (('yes' if abs(ours) > A['fid_std'] + B['fid_std'] else 'no') + f' (sd {A["fid_std"]:.2f} + {B["fid_std"]:.2f})'
                  if seeds > 1 else 'one seed: no spread')
        lines.append(f'| {a} vs {b} | {number(paper)} | {number(ours)} | {agrees or "the paper gives no FID"} | {beyond} |')
    if not lines:
        return []
    return ['', '| comparison (FID of A minus FID of B) | paper | mini | same direction | beyond the seeds\' spread |',
            '|---|---|---|---|---|'] + lines


def plot_group(group, summaries, out, real):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = [r['images_seen'] for s in summaries for records in s['curves'].values() for r in records]
    if not drawn:
        plt.close(fig)
        return None
    scale = images_axis(ax, drawn)
    for index, s in enumerate(summaries):
        for n, (seed, records) in enumerate(sorted(s['curves'].items())):
            ax.plot([r['images_seen'] / scale for r in records], [r['fid_min'] for r in records], marker='osD^v'[index % 5],
                    color=f'C{index}', alpha=0.9, label=s['row'].variant if n == 0 else None)
    # Logarithmic: an untrained network's FID is a hundred times a trained one's, and the variants differ late.
    ax.set_yscale('log')
    ax.axhline(real['fid'], color='0.4', ls='--', lw=1, label=f'real digits (held out): {real["fid"]:.2f}')
    ax.set_ylabel(f'FID (digit detector, {MINI_FID_IMAGES:,} samples; log scale)')
    ax.set_title(f'mini {group}: FID by training images (one line a seed)', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, f'fid-vs-images-{group}.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs'), help='where the mini run folders are')
    parser.add_argument('--out', help='where mini.md and the plots go (default: RUNS/mini)')
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.runs, 'mini')
    os.makedirs(out, exist_ok=True)
    any_row = MINI_ROWS[0]
    protocol = UPSTREAMS[any_row.upstream].protocol(any_row, run_folder(args.runs, any_row), smoke=False)
    real = floor(out, protocol)
    text = ['# Mini: the paper\'s comparisons at laptop scale on real digits (`make mini`)', '',
            f'FID and KID: {real["detector"]["name"]} (weights SHA-256 {real["detector"]["sha256"][:16]}...), {MINI_FID_IMAGES:,} samples '
            f'against the 4,000 training digits. Real-vs-real floor ({real["images"]:,} of the 1,000 held-out digits scored as samples are): '
            f'FID {real["fid"]:.2f}, KID {real["kid"]:.4f} ± {real["kid_std"]:.4f}. Paper FIDs: CIFAR-10 with Inception-v3, '
            f'for the direction only; never compare the numbers.', '']
    for group in MINI_GROUPS:
        summaries = [summary(row, args.runs) for row in MINI_ROWS if mini_group(row) == group]
        text += [f'## {group}', ''] + group_table(group, summaries) + comparison_lines(group, summaries)
        png = plot_group(group, summaries, out, real)
        text += ['', f'![FID by training images]({os.path.basename(png)})' if png else '(no runs yet)', '']
    with open(os.path.join(out, 'mini.md'), 'w') as f:
        f.write('\n'.join(text) + '\n')
    print('\n'.join(text))
    print(f'\nwritten to {os.path.relpath(out, ROOT)}/mini.md')


if __name__ == '__main__':
    main()
