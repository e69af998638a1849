"""`make kill-check`: a paper-row run killed mid-write, twice, and rerun ends as an uninterrupted run.

    python -m tools.checks.kill_check [--runs=runs/kill-check]

Three smoke runs of EDM's CIFAR-10 uncond with-LoRA row, each through the row driver
(tools.drivers.edm) exactly as `make edm-cifar-uncond VARIANT=with-lora SMOKE=1` runs it, scoring the
last snapshot once:
  uninterrupted   runs straight through;
  killed          is SIGKILLed (tools/checks/kill_midwrite.py: no cleanup runs) while train.py writes
                  network-snapshot-000001.pkl, run again, SIGKILLed while generate.py writes the PNG
                  of seed 5 during scoring, and run again to the end.
Then the two folders must hold the same snapshot, training state, FID record and sample grid: no
truncated file was taken as complete and nothing finished was lost. Takes a few minutes on 2 cores.
"""

import argparse
import json
import os
import pickle
import shutil
import sys

import numpy as np
import PIL.Image
import torch

from tools import ROOT
from tools.drivers import edm
from tools.paper.rows import find, run_folder
from tools.vendoring.upstream import import_vendor_tree

KILLER = [sys.executable, os.path.join(ROOT, 'tools', 'checks', 'kill_midwrite.py')]
ROW_FOLDER = os.path.basename(run_folder('', find('edm', 'cifar10-uncond', 'with-lora'), smoke=True))


def run_driver(runs, kill_at=None):
    """The row driver in this process; kill_at: the name prefix of the file whose write is killed.
    Returns True if the run ended, False if it was killed."""
    argv = ['cifar10-uncond', '--variant=with-lora', '--smoke', f'--runs={runs}', '--snapshots=last', '--fid-evaluations=1']
    launcher = KILLER + [kill_at, '--'] if kill_at else None # every launched step of the driver runs through it
    try:
        edm.main(argv, launcher)
        return True
    except SystemExit as stop: # run_step exits when a step fails, as a killed one does
        print(f'\n[kill-check] stopped: {stop}\n', flush=True)
        return False


def tensors(path, key):
    """The state (parameters and buffers) of the network `key` of a snapshot or training state."""
    with open(path, 'rb') as f:
        data = pickle.load(f) if path.endswith('.pkl') else torch.load(f, weights_only=False)
    return data[key].state_dict()


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs', 'kill-check'), help='scratch folder for the two runs (emptied first; one a checkout)')
    args = parser.parse_args()
    shutil.rmtree(args.runs, ignore_errors=True)
    uninterrupted, killed = os.path.join(args.runs, 'uninterrupted'), os.path.join(args.runs, 'killed')
    import_vendor_tree('edm', 'kill_check') # pickles and training states import EDM's modules

    assert run_driver(uninterrupted), 'the uninterrupted run failed'
    folder = os.path.join(killed, ROW_FOLDER)
    assert not run_driver(killed, kill_at='network-snapshot-000001'), 'expected the kill'
    left = sorted(os.listdir(folder))
    print(f'[kill-check] after the kill in the snapshot write: {", ".join(name for name in left if "000001" in name)}')
    assert 'network-snapshot-000001.pkl' not in left and 'training-state-000001.pt' not in left, 'no truncated file under its final name'
    assert not run_driver(killed, kill_at='000005'), 'expected the kill'
    print(f'[kill-check] after the kill in a PNG write: {len(os.listdir(os.path.join(folder, "scores")))} entries in scores/, '
          f'no record: {not any(name.endswith(".json") for name in os.listdir(os.path.join(folder, "scores")))}')
    assert run_driver(killed), 'the rerun failed'

    checks = []
    a, b = os.path.join(uninterrupted, ROW_FOLDER), folder
    checks.append(('network-snapshot-000001.pkl, EMA', same_tensors(*(tensors(os.path.join(d, 'network-snapshot-000001.pkl'), 'ema') for d in (a, b)))))
    checks.append(('training-state-000001.pt, network', same_tensors(*(tensors(os.path.join(d, 'training-state-000001.pt'), 'net') for d in (a, b)))))
    records = [json.load(open(os.path.join(d, 'scores', 'network-snapshot-000001.nfe7.32.json'))) for d in (a, b)]
    checks.append((f'FID record ({records[0]["fid_min"]:g} / {records[1]["fid_min"]:g})',
                   [e['fid'] for e in records[0]['evaluations']] == [e['fid'] for e in records[1]['evaluations']]))
    grids = [np.asarray(PIL.Image.open(os.path.join(d, 'samples.png'))) for d in (a, b)]
    checks.append(('samples.png', np.array_equal(*grids)))
    print()
    for what, same in checks:
        print(f'[kill-check] {what}: {"same as uninterrupted" if same else "DIFFERENT"}')
    if not all(same for _, same in checks):
        sys.exit('kill-check: the killed and rerun run differs from the uninterrupted one')
    print('[kill-check] passed: killed twice mid-write, rerun, and finished as the uninterrupted run')


if __name__ == '__main__':
    main()
