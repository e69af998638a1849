"""Run a script and SIGKILL it in the middle of writing one file.

    python tools/checks/kill_midwrite.py NAME -- SCRIPT <its arguments>     # the kill tests and make kill-check

The first file whose name starts with NAME that the script writes (through open(), as pickle.dump,
torch.save and PIL do with a path, or a file object given to np.savez or torch.save) gets a few
bytes on disk, then the process kills itself with SIGKILL, which no cleanup survives: the folder
holds what a kill mid-write leaves. The kill takes the processes the script started with it (a DataLoader's
worker would otherwise keep the output open until it notices, seconds later), as a job's kill does.
"""

import builtins
import io
import os
import runpy
import signal
import sys

import numpy as np
import torch


class KillMidWrite:
    """A writable file that passes on the first write, then kills the process at the next."""

    def __init__(self, file):
        self.file, self.writes = file, 0

    def write(self, data):
        if self.writes:
            self.file.flush()
            os.killpg(0, signal.SIGKILL)
        self.writes += 1
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)


def kill_when_writing(save, file_index, prefix):
    """save, which writes to its argument file_index, killing the process in files named prefix*."""
    def wrapped(*args, **kwargs):
        file = args[file_index]
        if os.path.basename(getattr(file, 'name', str(file))).startswith(prefix):
            args = args[:file_index] + (KillMidWrite(file),) + args[file_index + 1:]
        return save(*args, **kwargs)
    return wrapped


def open_killing(prefix):
    """open(), killing the process in the second write to a file named prefix* opened for writing."""
    def opener(file, mode='r', *args, **kwargs):
        opened = builtin_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and os.path.basename(file).startswith(prefix) and any(m in mode for m in 'wax+'):
            return KillMidWrite(opened)
        return opened
    return opener


builtin_open = builtins.open


def main():
    prefix = sys.argv[1]
    if os.getpgid(0) != os.getpid(): # already leading its group when started with start_new_session
        os.setsid() # a process group of this process and the ones it starts
    builtins.open = io.open = open_killing(prefix)
    np.savez = kill_when_writing(np.savez, 0, prefix)
    torch.save = kill_when_writing(torch.save, 1, prefix)
    script = sys.argv[sys.argv.index('--') + 1]
    sys.argv = sys.argv[sys.argv.index('--') + 1:]
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
