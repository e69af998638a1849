"""Run an upstream's own command in its vendor tree, echoing its output: every step of every driver
(training, generation, FID) goes through run_step."""

import os
import shlex
import socket
import subprocess
import sys

from tools import ROOT


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def run_step(command, tree, dry_run=False, env=None, stop_when=None):
    """Run `command` in vendor/<tree> (on its PYTHONPATH), echoing and returning its output.

    stop_when: a function called after each output line; when it returns True, the step has done
    its work (improved-diffusion trains until it is killed) and its process group is stopped.
    """
    cwd = os.path.join(ROOT, 'vendor', tree)
    print(f'\n[vendor/{tree}]$ {shlex.join(str(c) for c in command)}', flush=True)
    if dry_run:
        return ''
    # EDM's single-process scripts open a process group on MASTER_PORT (29500 unless set): each step gets
    # a free port, so that two runs on one machine do not join each other's group (torchrun sets its own).
    env = dict(os.environ, PYTHONPATH=cwd, **(env or {}))
    env.setdefault('MASTER_PORT', free_port())
    process = subprocess.Popen([str(c) for c in command], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    for line in process.stdout:
        print(line, end='', flush=True)
        output.append(line)
        if stop_when is not None and stop_when():
            os.killpg(process.pid, 15)
            process.wait()
            return ''.join(output)
    if process.wait() != 0:
        sys.exit(f'step failed ({process.returncode}): {shlex.join(str(c) for c in command)}')
    return ''.join(output)
