"""Run an upstream's own command in its vendor tree, echoing its output (every step of every driver:
training, generation, FID, goes through run_step), stop them all on Ctrl-C, and lock a run folder.

Each step runs in its own process group (start_new_session), so that one signal reaches the whole
tree a step starts (DataLoader workers, torchrun and its ranks, mpiexec and its ranks) and the
driver can stop it when it has done its work. The price: Ctrl-C at a terminal no longer reaches the
steps by itself, so while a step runs SIGINT and SIGTERM are caught (interruptible) and sent on to
every running step's group; the driver waits for them and exits 130 (143) with one line.
"""

import contextlib
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from tools import ROOT

STOP_GRACE_SECONDS = 60 # then SIGKILL: torchrun itself gives its ranks 30 s after a SIGTERM
running = [] # the Popen of every step now running; each leads its own process group
held_locks = [] # the descriptors of the run-folder locks this process holds; steps inherit them
interrupt_owner = [] # the name of the run that interruptible() reports, while its handler is in place


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def stop_running_steps(signum):
    """Send signum to every running step's process group, then wait until each group is empty
    (SIGKILL after STOP_GRACE_SECONDS). Reaps with os.waitpid, not Popen.wait: this runs in a signal
    handler, possibly while the interrupted code holds the Popen's wait lock."""
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in running:
        while not group_is_gone(process.pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.05)


def group_is_gone(pgid):
    """Is every process of the group that pgid leads gone? Reaps the leader (our child) on the way."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def step_name(command):
    """What a step runs, for messages: its script (train.py, under torchrun too), else the module of
    `python -m` (tools.drivers.edm), else its program."""
    command = [str(part) for part in command]
    script = next((part for part in command if part.endswith('.py')), None)
    if script is None and '-m' in command[:-1]:
        return command[command.index('-m') + 1]
    return os.path.basename(script or command[0])


@contextlib.contextmanager
def interruptible(what, resumes=True):
    """While inside: SIGINT or SIGTERM stops every running step (stop_running_steps) and exits
    128 + the signal's number with one line naming `what` and the step, and saying whether a rerun
    resumes. Nested uses keep the outer one's line; the previous handlers come back on leaving
    (tests call drivers in-process)."""
    if interrupt_owner:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN) # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        steps = ', '.join(step_name(p.args) for p in running)
        stop_running_steps(signum)
        during = f' during {steps}' if steps else ''
        rerun = 'Run the same command again to resume.' if resumes else 'Run the same command again to start over.'
        print(f'\n{what}: interrupted ({signal.Signals(signum).name}){during}; nothing it started is left running. {rerun}',
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    interrupt_owner.append(what)
    try:
        yield
    finally:
        interrupt_owner.pop()
        for signum, old in previous.items():
            signal.signal(signum, old)


def start(command, cwd, env=None, output=None):
    """Popen in a new process group, registered in `running`; the run-folder locks go with it."""
    process = subprocess.Popen([str(c) for c in command], cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT if output else None,
                               text=True, start_new_session=True, pass_fds=held_locks)
    running.append(process)
    return process


def run_tool(command, what, cwd=ROOT, env=None):
    """Run a command of this project (another driver, a download, nano.py) in cwd, its output going
    straight to ours (progress bars included); its exit status."""
    with interruptible(what):
        process = start(command, cwd, env)
        try:
            return process.wait()
        finally:
            running.remove(process)


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
    with interruptible(shlex.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))):
        process = start(command, cwd, env, output=subprocess.PIPE)
        try:
            output = []
            for line in process.stdout:
                print(line, end='', flush=True)
                output.append(line)
                if stop_when is not None and stop_when():
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait()
                    return ''.join(output)
            process.wait()
        finally:
            running.remove(process)
    if process.returncode != 0:
        sys.exit(f'step failed ({process.returncode}): {shlex.join(str(c) for c in command)}')
    return ''.join(output)


@contextlib.contextmanager
def working_in(folder, what, dry_run=False):
    """While a run works in folder: Ctrl-C or SIGTERM stops every step it started and exits with one
    line naming `what` (interruptible), and the folder is locked against a second run (locked_folder;
    not for a dry run, which writes nothing)."""
    with interruptible(what), (contextlib.nullcontext() if dry_run else locked_folder(folder, what)):
        yield


@contextlib.contextmanager
def locked_folder(folder, what):
    """Hold an OS lock (flock) on folder/.lock while inside, so that a second run on the same
    folder refuses in one line instead of writing into it beside this one. The kernel drops the
    lock when every holder of the descriptor is gone, so a crash never leaves a stale lock; the
    steps this process starts inherit it, so an orphaned step (its driver SIGKILLed) keeps the
    folder until it ends too. The file holds the holder's PID and command for the refusal."""
    path = os.path.join(folder, '.lock')
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors='replace').strip() or 'another process'
        os.close(fd)
        sys.exit(f'{what}: in use by {holder} or a step it started; wait for it to end or stop it, then run again')
    os.ftruncate(fd, 0)
    command = [os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]] + sys.argv[1:]
    os.write(fd, f'process {os.getpid()} ({shlex.join(command)})\n'.encode())
    held_locks.append(fd)
    try:
        yield
    finally:
        held_locks.remove(fd)
        os.close(fd) # the lock goes with the last descriptor; the file stays (removing it would race)
