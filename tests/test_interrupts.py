"""Ctrl-C and SIGTERM stop every process a run started (tools.vendoring.run.interruptible), and a run
folder takes one run at a time (locked_folder).

The steps here are stand-ins that sleep (a real step is tested by `make kill-check`): a step that
starts a child of its own, torchrun with two ranks and mpiexec with two ranks, each started the way a
driver starts a step, then the whole run is sent the signal a terminal's Ctrl-C sends (SIGINT to
its process group) or SIGTERM to the driver alone, as `make` forwards it.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from tools import ROOT
from tools.checks.kill_check import processes_naming
from tools.drivers import edm
from tools.vendoring.run import step_name
from tools.vendoring.run import locked_folder

# A step that starts a child of its own (as train.py starts DataLoader workers), both sleeping; the
# marker on their command lines finds them in /proc.
SLEEPER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', sys.argv[1]]); print('started', flush=True); time.sleep(120)"
MPIEXEC = os.path.join(os.path.dirname(sys.executable), 'mpiexec')


def driver_script(tmp_path, step):
    """A driver that runs `step` (a command list, as Python source) through run_step under interruptible."""
    script = tmp_path / 'driver.py'
    script.write_text(textwrap.dedent(f'''
        from tools.vendoring.run import interruptible, run_step
        with interruptible('test-run'):
            run_step({step}, 'edm')
        print('the step ended by itself')
    '''))
    return script


def processes_with(marker):
    return [pid for pid, _ in processes_naming(marker)]


def start_and_interrupt(tmp_path, step, marker, processes, signum, whole_group):
    """Start the driver in its own session, wait until `processes` processes carry the marker, signal it,
    and return (exit status, stderr, processes with the marker left a moment later)."""
    driver = subprocess.Popen([sys.executable, str(driver_script(tmp_path, step))], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.monotonic() + 60
    while len(processes_with(marker)) < processes:
        assert driver.poll() is None and time.monotonic() < deadline, f'the step did not start: {driver.communicate()}'
        time.sleep(0.05)
    time.sleep(0.5) # signal handlers in place in every process
    if whole_group:
        os.killpg(driver.pid, signum)
    else:
        os.kill(driver.pid, signum)
    _, stderr = driver.communicate(timeout=90)
    time.sleep(0.2)
    left = processes_with(marker)
    for pid in left: # do not leave them behind a failing test
        os.kill(pid, signal.SIGKILL)
    return driver.returncode, stderr, left


@pytest.mark.parametrize('signum, whole_group', [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=['ctrl-c', 'sigterm-to-driver'])
def test_a_signal_stops_the_step_and_its_children_and_exits_in_one_line(tmp_path, signum, whole_group):
    marker = uuid.uuid4().hex
    status, stderr, left = start_and_interrupt(tmp_path, f"[{sys.executable!r}, '-c', {SLEEPER!r}, {marker!r}]", marker, 2, signum, whole_group)
    assert left == []
    assert status == 128 + signum
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in stderr, stderr
    assert lines[0].startswith('test-run: interrupted') and 'Run the same command again to resume' in lines[0]


@pytest.mark.parametrize('launcher', ['torchrun', 'mpiexec'])
def test_ctrl_c_leaves_no_rank_running(tmp_path, launcher):
    if launcher == 'mpiexec' and not shutil.which(MPIEXEC):
        pytest.fail(f'{MPIEXEC} is missing: the environment installs mpich (requirements.txt)')
    marker = uuid.uuid4().hex
    rank = tmp_path / 'rank.py'
    rank.write_text('import sys, time\nprint("rank up", flush=True)\ntime.sleep(120)\n')
    prefix = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] if launcher == 'torchrun'
              else [MPIEXEC, '-n', '2', sys.executable])
    status, stderr, left = start_and_interrupt(tmp_path, repr(prefix + [str(rank), marker]), marker, 3, signal.SIGINT, True)
    assert left == [] and status == 130, stderr


def hold_lock(folder, marker):
    """A process that holds the folder's lock, then starts a step that sleeps (the lock goes with it).
    The holder, with its step as holder.step: (PID, start time) of a process that is not our child."""
    code = (f'import sys, time; from tools.vendoring.run import locked_folder, start\n'
            f'with locked_folder({str(folder)!r}, "holder"):\n'
            f'    step = start([sys.executable, "-c", "import time; time.sleep(60)", {marker!r}], "/")\n'
            f'    print("locked", step.pid, flush=True); time.sleep(60)\n')
    holder = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    word, step_pid = holder.stdout.readline().split()
    assert word == 'locked'
    holder.step = (int(step_pid), process_state(int(step_pid))[1])
    return holder


def process_state(pid):
    """(state letter, start time) of pid from /proc/<pid>/stat, or None when there is no such process."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], fields[19]


def still_running(step):
    """Is the step still running (not exited: a zombie has closed its files), and not a new process on its PID?"""
    pid, started = step
    state = process_state(pid)
    return state is not None and state[0] != 'Z' and state[1] == started


def kill_all(holder, marker):
    """SIGKILL the holder and its step, and wait until the step has exited and no process carries the
    marker. The step, which holds the lock, is waited for by its PID rather than found by the scan of
    command lines, which once let this test go on while the lock was still held."""
    holder.kill()
    holder.wait()
    deadline = time.monotonic() + 30
    while True:
        left = processes_with(marker) + ([holder.step[0]] if still_running(holder.step) else [])
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f'cannot stop {left} (the step is {holder.step[0]})'
        time.sleep(0.05)


def test_a_second_run_on_a_locked_folder_refuses_naming_the_holder_and_no_lock_outlives_its_holders(tmp_path):
    marker = uuid.uuid4().hex
    holder = hold_lock(tmp_path, marker)
    with pytest.raises(SystemExit) as refusal:
        with locked_folder(str(tmp_path), 'second'):
            pass
    assert f'in use by process {holder.pid}' in str(refusal.value) and '\n' not in str(refusal.value)
    holder.kill() # SIGKILL: no clean-up runs in the holder
    holder.wait()
    # Its step, orphaned, still holds the folder: a rerun must not write beside it.
    with pytest.raises(SystemExit):
        with locked_folder(str(tmp_path), 'second'):
            pass
    kill_all(holder, marker)
    deadline = time.monotonic() + 30
    while True:
        try:
            with locked_folder(str(tmp_path), 'second'):
                break
        except SystemExit:
            held = subprocess.run(['lslocks', '-n', '-o', 'PID,COMMAND,PATH'], text=True, capture_output=True).stdout if shutil.which('lslocks') else '?'
            assert time.monotonic() < deadline, f'the lock outlived every process that held it; locks: {held}'
            time.sleep(0.05)


def test_a_row_driver_refuses_a_folder_another_run_holds(tmp_path):
    folder = tmp_path / 'edm-cifar10-uncond-with-lora-smoke'
    folder.mkdir()
    marker = uuid.uuid4().hex
    holder = hold_lock(folder, marker)
    try:
        with pytest.raises(SystemExit) as refusal:
            edm.main(['cifar10-uncond', '--variant=with-lora', '--smoke', f'--runs={tmp_path}'])
        assert f'in use by process {holder.pid}' in str(refusal.value)
        assert os.listdir(folder) == ['.lock'] # refused before anything was written
    finally:
        kill_all(holder, marker)


def test_the_interrupted_step_is_named_by_its_script_or_module():
    assert step_name(['/venv/python', 'train.py', '--outdir=x']) == 'train.py'
    assert step_name(['/venv/python', '-m', 'torch.distributed.run', '--nproc_per_node=2', 'train.py']) == 'train.py'
    assert step_name(['/venv/python', '-m', 'tools.drivers.edm', 'mini-uncond']) == 'tools.drivers.edm' # make mini's steps
    assert step_name(['/venv/bin/mpiexec', '-n', 2, '/venv/python', 'scripts/image_train.py']) == 'image_train.py'
    assert step_name(['git', 'clone', 'url']) == 'git'
