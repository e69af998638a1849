"""`make results`: every run's FID records beside the paper's numbers, laid out like its Tables 1, 2 and 3.

    python -m tools.scoring.results [--smoke] [--runs=runs] [--out=FOLDER]

Reads the records that tools.scoring.score writes (runs/<row>/scores/*.json) and writes, into --out
(default runs/results, or runs/results-smoke): results.md (also printed), results.csv and one
fid-vs-images-<table>.png a table. A cell without a run stays empty: nothing is filled from the paper.

Which snapshot a row reports: tools.scoring.records.best (README, "Scoring"). A difference to the
baseline smaller than the larger spread of the two is marked with "~": seeds alone move FID that much.
Runs of the authors' released checkpoints (runs/<row>-authors, `make edm-authors-checkpoint`) are
listed under their row.
"""

import argparse
import csv
import os
import textwrap

from tools import ROOT
from tools.paper import params
from tools.paper.rows import ROWS, row_of_folder, run_folder
from tools.scoring.records import DETECTORS, by_protocol, load_records, reported

TABLES = {
    'Table 1': 'Table 1: FID of the baseline (scale-and-shift), only LoRA and with LoRA',
    'Table 2': 'Table 2: CIFAR-10 uncond with LoRA, bases and rank',
    'Table 3': 'Table 3: CIFAR-10, conditioning of the attention layers only: LoRA vs adaLN',
    'Other': 'Other runs (not a paper table): ClassLoRA (Fig. 5), LoRA-only fine-tuning',
    'EDM2': "EDM2 with UC-LoRA on its attention (not in the paper; \"FID (paper)\": EDM2's published FID of its preset, where there is one)",
}
UPSTREAMS = {'edm': 'EDM (vp)', 'iddpm': 'IDDPM', 'edm2': 'EDM2'} # as the paper's Table 1 names them (EDM2: not in the paper)
SMOKE_NOTE = ('Smoke runs: tiny networks, a few training steps on synthetic images, FID by a stand-in detector '
              '(tools/scoring/fid_standin.py) against their own data. The numbers check the plumbing only.')


SOURCES = {False: 'trained here', True: "the authors' released checkpoint"} # by run_folder(authors=)
SMOKE_PLOT_NOTES = {
    'default': "Smoke runs: 1 kimg at the start of EDM's learning-rate ramp-up, so the variants barely leave their common "
               "initial network; stand-in detector.",
    'EDM2': 'Smoke runs: 2 kimg of a tiny network on 64 synthetic images; stand-in detector. The numbers check the plumbing only.',
}


def runs_of(row, runs, smoke):
    """(folder, records) of a row's runs: its own and, for EDM rows, one of the authors' converted checkpoint."""
    folders = [run_folder(runs, row, smoke, authors) for authors in SOURCES]
    return [(folder, records) for folder in folders for records in [load_records(folder)] if records]


def mimg(images):
    return f'{images / 1e6:.3g}'


def collect(runs, smoke, count_params=True):
    """One line per (table, row, run, NFE and images), with the paper's numbers and ours; rows without a
    run keep empty cells."""
    lines = []
    counts = {}
    for row in ROWS:
        if row.upstream == 'dataflowr':
            continue # Fig. 3 and 4: `make nano-compare`
        tables = ['EDM2'] if row.upstream == 'edm2' else [table for table in row.tables if table in TABLES] or ['Other']
        found = [(folder, group) for folder, records in runs_of(row, runs, smoke) for group in by_protocol(records)]
        for folder, records in found or [(None, [])]:
            best, last = reported(records)
            if best and count_params and row.name not in counts:
                counts[row.name] = params_of(row)
            for table in tables:
                lines.append(dict(
                    table=table, row=row.name, dataset=row.recipe.title, upstream=row.upstream, conditioning=row.title(table),
                    bases=row.lora_bases or '', rank=row.lora_rank or '', folder=folder,
                    source=SOURCES[row_of_folder(folder)[2]] if folder else '',
                    params_paper=row.paper_params or '', params_ours=counts.get(row.name, '') if best else '',
                    nfe=best['nfe'] if best else '', fid_paper=row.paper_fid if row.paper_fid is not None else '',
                    fid=round(best['fid_min'], 4) if best else '', spread=round(best['fid_spread'], 4) if best else '',
                    evaluations=f'{best["fid_count"]}/{best.get("evaluations_planned", 1)}' if best else '',
                    snapshot=best['snapshot'] if best else '', mimg=mimg(best['images_seen']) if best else '',
                    fid_last=round(last['fid_min'], 4) if last else '', mimg_last=mimg(last['images_seen']) if last else '',
                    snapshots=len(records) or '', images=best['images'] if best else '', detector=best['detector'] if best else ''))
    mark_differences(lines, smoke)
    return lines


def params_of(row):
    """Our parameter count of a row (tools.paper.params), or '' where the vendor tree is missing."""
    try:
        return params.COUNTERS[row.upstream](row)
    except Exception as err: # counting is a convenience here: a missing vendor tree leaves the cell empty
        print(f'{row.name}: no parameter count ({err})')
        return ''


def is_authors(line):
    return line.get('folder') is not None and row_of_folder(line['folder'])[2]


def mark_differences(lines, smoke=False):
    """vs_baseline: our FID minus the recipe's baseline, '~' when within the larger spread; the paper's
    likewise (not against a smoke run's spread, which says nothing about the paper's runs)."""
    baselines = {(line['upstream'], line['dataset']): line for line in lines if line['row'].endswith('-baseline') and not is_authors(line)}
    for line in lines:
        line['vs_baseline'] = line['paper_vs_baseline'] = ''
        base = baselines.get((line['upstream'], line['dataset']))
        if base is None or line is base:
            continue
        spreads = [value for value in (line['spread'], base['spread']) if value != '']
        spread = max(spreads) if spreads else None
        if line['fid'] != '' and base['fid'] != '':
            delta = line['fid'] - base['fid']
            line['vs_baseline'] = f'{delta:+.3g}' + (' ~' if abs(delta) <= spread else '')
        if line['fid_paper'] != '' and base['fid_paper'] != '':
            delta = line['fid_paper'] - base['fid_paper']
            line['paper_vs_baseline'] = f'{delta:+.3g}' + (' ~' if spread is not None and not smoke and abs(delta) <= spread else '')


COLUMNS = [('upstream', 'Code'), ('conditioning', 'Row'), ('source', 'Run'), ('params_paper', 'Params (paper)'), ('params_ours', 'Params (ours)'), ('nfe', 'NFE'), ('images', 'FID images'),
           ('fid_paper', 'FID (paper)'), ('fid', 'FID (ours, best)'), ('spread', 'Spread'), ('evaluations', 'Evals'),
           ('snapshot', 'Best snapshot'), ('mimg', 'Mimg'), ('fid_last', 'FID (last)'), ('mimg_last', 'Mimg (last)'),
           ('vs_baseline', 'vs baseline (ours)'), ('paper_vs_baseline', 'vs baseline (paper)')]


def markdown(lines, smoke):
    def cell(value):
        return f'{value:,}' if isinstance(value, int) and value > 9999 else UPSTREAMS.get(value, str(value))
    text = ['# Results beside the paper', '', '`make results` (tools/scoring/results.py); rule and protocol: README, "Scoring".', '']
    if smoke:
        text += [f'**{SMOKE_NOTE}**', '']
    for table, title in TABLES.items():
        chosen = [line for line in lines if line['table'] == table and (table not in ('Other', 'EDM2') or line['fid'] != '')]
        if not chosen:
            continue
        text += [f'## {title}', '', '| ' + ' | '.join(header for _, header in COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
        for line in chosen:
            text.append('| ' + ' | '.join(cell(line[key]) for key, _ in COLUMNS) + ' |')
        text.append('')
    text += ['"~": within the larger FID spread of the row and its baseline (seeds alone move FID that much). '
             'Empty: no run (never filled from the paper).', '']
    return '\n'.join(text)

#----------------------------------------------------------------------------
# FID against training images: one picture a run (written after scoring) and one a table.

def images_axis(ax, images):
    """Training images on the x axis: millions, thousands for runs below a million, or images for runs
    below a thousand (smoke runs). Returns the scale to divide image counts by."""
    most = max(images, default=0)
    scale, unit = (1e6, ' (millions)') if most >= 1e6 else (1e3, ' (thousands)') if most >= 1e3 else (1, '')
    ax.set_xlabel(f'training images{unit}')
    ax.ticklabel_format(useOffset=False)
    return scale


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def fid_axis(ax, values):
    """FID limits at least 1% of the FID (0.1 at least) wide, ticks without an offset: a smoke run's
    FIDs differ in the fourth decimal, and an axis fitted to them draws that as a steep curve. FIDs
    that span more than a factor of 20 (an untrained network's beside trained ones) on a log scale:
    a linear axis flattens every trained point onto zero."""
    low, high = min(values), max(values)
    if low > 0 and high / low > 20:
        ax.set_yscale('log')
        return
    least = max(0.01 * high, 0.1)
    if high - low < least:
        middle = (low + high) / 2
        ax.set_ylim(middle - least / 2, middle + least / 2)
    ax.ticklabel_format(axis='y', useOffset=False, style='plain')


def plot_run(folder):
    """folder/fid-vs-images.png: every evaluation of every snapshot, the minimum joined, the reported
    snapshot marked; one line for each NFE and number of images the run was scored with."""
    plt = pyplot()
    records = load_records(folder)
    groups = by_protocol(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    scale = images_axis(ax, [r['images_seen'] for r in records])
    for index, group in enumerate(groups):
        best, _ = reported(group)
        for record in group:
            ax.scatter([record['images_seen'] / scale] * record['fid_count'], [e['fid'] for e in record['evaluations']], color='0.6', s=12, zorder=2)
        what = f'{best["images"]:,} images, NFE {best["nfe"]}: ' if len(groups) > 1 else ''
        ax.plot([r['images_seen'] / scale for r in group], [r['fid_min'] for r in group], '-o', color=f'C{index}', ms=4, zorder=3,
                label=what + ('minimum of the evaluations (EDM\'s rule)' if max(r['fid_count'] for r in group) > 1 else 'FID (one evaluation)'))
        ax.scatter([best['images_seen'] / scale], [best['fid_min']], marker='*', s=180, color='C3', zorder=4,
                   label=f'reported: {best["snapshot"]}, FID {best["fid_min"]:.3g}')
    if max(r['fid_count'] for r in records) > 1:
        ax.scatter([], [], color='0.6', s=12, label='each evaluation (other seeds)')
    said = ['digit detector'] if records[0].get('detector') == DETECTORS['digits'] else [] # a mini run's FIDs are not Inception's
    if len(groups) == 1: # one protocol: said once here, not in the legend
        said += [f'{records[0]["images"]:,} images', f'NFE {records[0]["nfe"]}']
    ax.set_ylabel(f'FID ({", ".join(said)})' if said else 'FID')
    fid_axis(ax, [e['fid'] for r in records for e in r['evaluations']])
    smoke = row_of_folder(folder)[1]
    ax.set_title(os.path.basename(folder) + ('\nsmoke run: stand-in detector, plumbing only' if smoke else ''), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(folder, 'fid-vs-images.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_table(lines, table, smoke, out):
    """One panel a recipe, one line a run of the table (its minimum FID by training images), the paper's value dashed."""
    plt = pyplot()
    chosen = [line for line in lines if line['table'] == table and line['fid'] != '']
    if not chosen:
        return None
    recipes = sorted({(line['upstream'], line['dataset']) for line in chosen})
    fig, axes = plt.subplots(1, len(recipes), figsize=(5.2 * len(recipes), 4.2), squeeze=False)
    for ax, (upstream, dataset) in zip(axes[0], recipes):
        drawn = [line for line in chosen if (line['upstream'], line['dataset']) == (upstream, dataset)]
        runs_drawn = []
        for line in drawn:
            records = [r for r in load_records(line['folder']) if (r['nfe'], r['images']) == (line['nfe'], line['images'])]
            runs_drawn.append((line, records))
        scale = images_axis(ax, [r['images_seen'] for _, records in runs_drawn for r in records])
        for index, (line, records) in enumerate(runs_drawn):
            color = f'C{index % 10}'
            label = line['conditioning'].split(', ', 1)[1] + (" (authors')" if is_authors(line) else '')
            # Markers and dashes of their own, so that runs with the same FIDs (smoke runs) stay visible.
            ax.plot([r['images_seen'] / scale for r in records], [r['fid_min'] for r in records], marker='osD^v<>'[index % 7],
                    ls=['-', '--', ':', '-.'][index % 4], ms=7 - index % 4, color=color, label=label)
            if line['fid_paper'] != '' and not smoke:
                ax.axhline(line['fid_paper'], color=color, ls='--', lw=1)
        ax.set_title(f'{UPSTREAMS[upstream]}: {dataset}' + (' (smoke)' if smoke else ''), fontsize=10)
        ax.set_ylabel('FID (minimum of the evaluations)')
        fid_axis(ax, [r['fid_min'] for _, records in runs_drawn for r in records] + ([] if smoke else [line['fid_paper'] for line in drawn if line['fid_paper'] != '']))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    note = (SMOKE_PLOT_NOTES.get(table, SMOKE_PLOT_NOTES['default']) if smoke else
            "(dashed: EDM2's published FID)" if table == 'EDM2' else '(dashed: the paper)')
    fig.suptitle('\n'.join(textwrap.wrap(TABLES[table], 75 * len(recipes)) + textwrap.wrap(note, 75 * len(recipes))), fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, f'fid-vs-images-{table.lower().replace(" ", "-")}.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', help='where the run folders are (default: runs/, which a fresh clone has not made yet)')
    parser.add_argument('--smoke', action='store_true', help='the smoke runs (runs/*-smoke) instead of the full ones')
    parser.add_argument('--out', help='where results.md, results.csv and the plots go (default: RUNS/results[-smoke])')
    args = parser.parse_args()
    if args.runs is not None and not os.path.isdir(args.runs):
        parser.error(f'{args.runs} is not a folder')
    args.runs = args.runs or os.path.join(ROOT, 'runs') # no run yet: every table with empty cells
    out = args.out or os.path.join(args.runs, 'results-smoke' if args.smoke else 'results')
    os.makedirs(out, exist_ok=True)
    lines = collect(args.runs, args.smoke, count_params=not args.smoke) # a smoke run's tiny network is not the row's
    text = markdown(lines, args.smoke)
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=[key for key in lines[0] if key != 'folder'], extrasaction='ignore')
        writer.writeheader()
        writer.writerows(lines)
    print(text)
    pictures = [plot_table(lines, table, args.smoke, out) for table in TABLES]
    scored = sum(line['fid'] != '' for line in lines)
    print(f'{scored} of {len(lines)} table lines have a run; written to {os.path.relpath(out, ROOT)}/: results.md, results.csv'
          + ''.join(f', {os.path.basename(p)}' for p in pictures if p))


if __name__ == '__main__':
    main()
