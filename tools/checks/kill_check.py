"""`make kill-check`: a paper-row run killed mid-write, twice, and rerun ends as an uninterrupted run.

    python -m tools.checks.kill_check [--runs=runs/kill-check]

Three smoke runs of EDM's CIFAR-10 uncond with-LoRA row, each through the row driver
(tools.drivers.edm) exactly as `make edm-cifar-uncond VARIANT=with-lora SMOKE=1` runs it, scoring the
last snapshot once:
  uninterrupted   runs straight through;
  killed          is SIGKILLed (tools/checks/kill_midwrite.py: no cleanup runs) while train.py writes
                  network-snapshot-000001.pkl, run again, SIGKILLed while generate.py writes the PNG
                  of seed 5 during scoring, and run again to the end.
  interrupted     is started as `make` starts it, in its own process group, and Ctrl-C'd (SIGINT to
                  the group, as a terminal sends it) while train.py trains, while generate.py
                  writes images and while fid.py computes statistics; after each, the driver must
                  have exited 130 with nothing it started left running, and the rerun goes on.
Then the killed and the interrupted folders must each hold the same snapshot, training state, FID
record and sample grid as the uninterrupted one: no truncated file was taken as complete and
nothing finished was lost. Takes 2 to 3 minutes on 2 cores.
"""

import argparse
import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import torch

from tools import ROOT
from tools.drivers import edm
from tools.paper.rows import find, run_folder
from tools.vendoring.upstream import import_vendor_tree

KILLER = [sys.executable, os.path.join(ROOT, 'tools', 'checks', 'kill_midwrite.py')]
ROW_FOLDER = os.path.basename(run_folder('', find('edm', 'cifar10-uncond', 'with-lora'), smoke=True))


ARGV = ['cifar10-uncond', '--variant=with-lora', '--smoke', '--snapshots=last', '--fid-evaluations=1']


def run_driver(runs, kill_at=None):
    """The row driver in this process; kill_at: the name prefix of the file whose write is killed.
    Returns True if the run ended, False if it was killed."""
    argv = ARGV + [f'--runs={runs}']
    launcher = KILLER + [kill_at, '--'] if kill_at else None # every launched step of the driver runs through it
    try:
        edm.main(argv, launcher)
        return True
    except SystemExit as stop: # run_step exits when a step fails, as a killed one does
        print(f'\n[kill-check] stopped: {stop}\n', flush=True)
        return False


def processes_naming(text):
    """(pid, command line) of every process whose command line contains text, this one excepted."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                command = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
        except OSError: # gone meanwhile
            continue
        if text in command and int(pid) != os.getpid():
            found.append((int(pid), command))
    return found


def step_running(runs, script):
    """Is a step of the run in `runs` whose command names `script` running?"""
    return any(script in command for _, command in processes_naming(runs))


def interrupt_driver(runs, moment, ready):
    """Start the row driver as make does (its own process group, SIGINT at its default), send the
    group SIGINT once ready() is true, then check that it exited 130 and left nothing running."""
    process = subprocess.Popen([sys.executable, '-m', 'tools.drivers.edm', *ARGV, f'--runs={runs}'], cwd=ROOT, start_new_session=True)
    while process.poll() is None and not ready():
        time.sleep(0.02)
    assert process.poll() is None, f'the run ended before the moment "{moment}"'
    os.killpg(process.pid, signal.SIGINT)
    process.wait()
    left = processes_naming(runs)
    print(f'\n[kill-check] SIGINT {moment}: the driver exited {process.returncode}; processes of the run left: {len(left)}', flush=True)
    for pid, command in left:
        print(f'[kill-check]   {pid}: {command}')
    assert process.returncode == 130 and not left, f'SIGINT {moment}: expected exit 130 and nothing left running'


def tensors(path, key):
    """The state (parameters and buffers) of the network `key` of a snapshot or training state."""
    with open(path, 'rb') as f:
        data = pickle.load(f) if path.endswith('.pkl') else torch.load(f, weights_only=False)
    return data[key].state_dict()


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs', 'kill-check'), help='scratch folder for the three runs (emptied first; one a checkout)')
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

    interrupted = os.path.join(args.runs, 'interrupted')
    folder = os.path.join(interrupted, ROW_FOLDER)
    pngs = lambda: glob.glob(os.path.join(folder, 'scores', '*', 'evaluation-*', '*', '*.png'))
    interrupt_driver(interrupted, 'while train.py trains',
                     lambda: step_running(interrupted, 'train.py') and 'Training for' in read_text(os.path.join(folder, 'log.txt')))
    interrupt_driver(interrupted, 'while generate.py writes images', lambda: step_running(interrupted, 'generate.py') and len(pngs()) >= 8)
    interrupt_driver(interrupted, 'while fid.py computes statistics', lambda: step_running(interrupted, 'calc --images='))
    assert run_driver(interrupted), 'the rerun after the interrupts failed'

    a = os.path.join(uninterrupted, ROW_FOLDER)
    results = [same_as(a, os.path.join(killed, ROW_FOLDER), 'killed twice'), same_as(a, folder, 'interrupted three times')]
    if not all(results):
        sys.exit('kill-check: a killed or interrupted run, rerun, differs from the uninterrupted one')
    print('[kill-check] passed: killed twice mid-write, interrupted three times, rerun, and finished as the uninterrupted run')


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ''


def same_as(a, b, label):
    """Do run folders a and b hold the same snapshot, training state, FID record and samples? Prints each."""
    checks = []
    checks.append(('network-snapshot-000001.pkl, EMA', same_tensors(*(tensors(os.path.join(d, 'network-snapshot-000001.pkl'), 'ema') for d in (a, b)))))
    checks.append(('training-state-000001.pt, network', same_tensors(*(tensors(os.path.join(d, 'training-state-000001.pt'), 'net') for d in (a, b)))))
    records = [json.load(open(os.path.join(d, 'scores', 'network-snapshot-000001.nfe7.32.json'))) for d in (a, b)]
    checks.append((f'FID record ({records[0]["fid_min"]:g} / {records[1]["fid_min"]:g})',
                   [e['fid'] for e in records[0]['evaluations']] == [e['fid'] for e in records[1]['evaluations']]))
    grids = [np.asarray(PIL.Image.open(os.path.join(d, 'samples.png'))) for d in (a, b)]
    checks.append(('samples.png', np.array_equal(*grids)))
    print()
    for what, same in checks:
        print(f'[kill-check] {label}: {what}: {"same as uninterrupted" if same else "DIFFERENT"}')
    return all(same for _, same in checks)


if __name__ == '__main__':
    main()
