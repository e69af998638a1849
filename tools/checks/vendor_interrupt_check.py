"""`make vendor-interrupt-check`: `make vendor-edm REBUILD=1` interrupted by Ctrl-C at random moments
never leaves a broken tree nor loses a user's file.

    python -m tools.checks.vendor_interrupt_check [--tries=20] [--seed=0]

Times an uninterrupted `make vendor-edm REBUILD=1` (median of 3), then puts a user's file in vendor/edm
(training-runs/vendor-interrupt-check.txt) and, each try, starts `make vendor-edm REBUILD=1` in a
process group of its own and sends SIGINT to the group (as Ctrl-C does to make and all it started)
at a random moment of that duration (seeded; one moment in each of `tries` equal parts of it, so that
they cover it all), waits, then runs `make vendor-edm`. After each try vendor/edm must be a clean tree
recording the current inputs digest, with one commit a patch plus the overlay commit over the pinned
one; vendor/pristine/edm the untouched pinned commit; no build folder left; and every file the check
put in vendor/edm still there or in a folder a rebuild moved aside (a rebuild that got to its swap
moved the tree with the file aside: a new file is put in for the next try). Prints each try's moment
and outcome, then a summary line; exit status 1 if a check failed. At the end it removes its file and
the aside folders it made, once it has found its files in them and nothing else. Refuses to start
when vendor/edm holds anything of the user's, which twenty rebuilds would move aside.

A Ctrl-C in Python's own start-up, before the first lines of tools/vendoring/build.py set its
handler, ends in Python's KeyboardInterrupt traceback (nothing has begun); the summary counts them.
"""

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from tools import ROOT
from tools.vendoring.build import users_work
from tools.vendoring.upstream import VendorError, git, inputs_digest, read_series, read_upstream, vendor_dir

USER_FILE = os.path.join('training-runs', 'vendor-interrupt-check.txt') # where a user keeps their runs
MARK = 'a user snapshot, written by vendor_interrupt_check before try ' # its content, then the try's number
MAKE = ['make', '--no-print-directory']


def make(*targets):
    """Run make and return (exit status, output)."""
    result = subprocess.run(MAKE + list(targets), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return result.returncode, result.stdout


def besides_the_checks_file(folder):
    """What git status lists in folder beyond the check's own file (and Python's caches)."""
    status = git(folder, 'status', '--porcelain', '--untracked-files=all', '--ignored').splitlines()
    return [line for line in status if line != f'?? {USER_FILE}' and '__pycache__/' not in line and not line.endswith('.pyc')]


def asides(dest):
    """The folders a rebuild moved dest's old trees to."""
    folder, base = os.path.split(dest)
    return {os.path.join(folder, name) for name in os.listdir(folder) if name.startswith(base + '.old-')}


def interrupted_rebuild(moment):
    """make vendor-edm REBUILD=1 in a process group of its own, SIGINT to the group `moment` seconds
    after the start. Returns (how it ended: a key of ENDINGS; in words; its output)."""
    start = time.monotonic()
    process = subprocess.Popen(MAKE + ['vendor-edm', 'REBUILD=1'], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(max(0.0, start + moment - time.monotonic()))
    try:
        os.killpg(process.pid, signal.SIGINT)
    except ProcessLookupError: # the group has ended already
        pass
    output = process.communicate(timeout=300)[0]
    # make ends itself with the signal it got, once its command has ended
    status = f'make ended by {signal.Signals(-process.returncode).name}' if process.returncode < 0 else f'exit {process.returncode}'
    said = [line for line in output.splitlines() if line.startswith('vendor: ')]
    if 'Traceback' in output:
        # KeyboardInterrupt is Python's own handler: the signal came before build.py's first lines set its own
        kind = 'startup' if '\nKeyboardInterrupt\n' in output else 'traceback'
        ours = [line.strip().replace(ROOT + os.sep, '') for line in output.splitlines() if line.strip().startswith(f'File "{ROOT}')]
        where = f'at {ours[-1]}' if ours else "in Python's start-up"
        return kind, f'{"TRACEBACK" if kind == "traceback" else "KeyboardInterrupt traceback"} {where} ({status})', output
    if process.returncode == 0:
        return 'finished', 'finished before the signal', output
    if said and said[0].startswith('vendor: interrupted'):
        return 'interrupted', f'{said[0]} ({status})', output
    if 'ready at' in output: # the Makefile starts Python with the signals ignored until build.py handles them
        return 'ignored', f'signal in Python\'s start-up, ignored there; the build went on to the end ({status})', output
    return 'before', f'ended before the build began, no line ({status})', output


ENDINGS = {'interrupted': 'interrupted, in one line', 'before': 'stopped before Python ran the build',
           'ignored': 'signalled in Python\'s start-up, which ignores it, and built to the end',
           'startup': "stopped by Python's own KeyboardInterrupt (its traceback), in its start-up", 'finished': 'finished before the signal',
           'traceback': 'ended in a TRACEBACK'}


def check_trees(upstream, digest, patches):
    """What is wrong with vendor/edm and vendor/pristine/edm; [] if nothing."""
    tree, pristine = vendor_dir(upstream), vendor_dir(upstream, pristine=True)
    wrong = []
    try:
        extra = besides_the_checks_file(tree)
        if extra:
            wrong.append(f'vendor/edm is not clean: {extra}')
        message = git(tree, 'log', '-1', '--format=%B')
        if f'Inputs-Digest: {digest}' not in message or f'Upstream-Commit: {upstream["commit"]}' not in message:
            wrong.append('vendor/edm does not record the current inputs')
        count = git(tree, 'rev-list', '--count', f'{upstream["commit"]}..HEAD')
        if count != str(patches + 1):
            wrong.append(f'vendor/edm has {count} commits over the pinned one, not {patches + 1}')
        if git(pristine, 'rev-parse', 'HEAD') != upstream['commit'] or git(pristine, 'status', '--porcelain', '--untracked-files=all', '--ignored'):
            wrong.append('vendor/pristine/edm is not the untouched pinned commit')
        if os.path.exists(os.path.join(pristine, '.git', 'objects', 'info', 'alternates')):
            wrong.append('vendor/pristine/edm borrows objects of another tree')
    except VendorError as err:
        wrong.append(str(err))
    for folder in [os.path.dirname(tree), os.path.dirname(pristine)]:
        left = [name for name in os.listdir(folder) if name.startswith(('.build-', '.trash-'))]
        if left:
            wrong.append(f'left in {os.path.relpath(folder, ROOT)}: {", ".join(left)}')
    return wrong


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tries', type=int, default=20, help='interrupted rebuilds')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random moments')
    args = parser.parse_args()
    upstream = read_upstream('edm')
    tree, pristine = vendor_dir(upstream), vendor_dir(upstream, pristine=True)
    digest, patches = inputs_digest('edm', upstream), len(read_series('edm'))

    status, output = make('vendor-edm')
    if status != 0:
        sys.exit(f'vendor-interrupt-check: make vendor-edm failed first:\n{output}')
    own = os.path.join(tree, USER_FILE)
    if os.path.exists(own) and open(own).read().startswith(MARK): # left by a check that was stopped
        os.remove(own)
    work = users_work(tree, upstream)
    if work:
        sys.exit(f'vendor-interrupt-check: vendor/edm holds {work}; the check rebuilds it {args.tries} times: move them out of it first')
    before = asides(tree) | asides(pristine)

    durations = []
    for _ in range(3): # the median of three: on a busy machine one run can take twice as long
        start = time.monotonic()
        status, output = make('vendor-edm', 'REBUILD=1')
        durations.append(time.monotonic() - start)
        if status != 0:
            sys.exit(f'vendor-interrupt-check: make vendor-edm REBUILD=1 failed:\n{output}')
    duration = sorted(durations)[1]
    print(f'[vendor-interrupt-check] an uninterrupted make vendor-edm REBUILD=1 takes {duration:.3f} s (median of 3); '
          f'{args.tries} tries, SIGINT at random moments in it (seed {args.seed})', flush=True)

    rng = random.Random(args.seed)
    moments = [(i + rng.random()) * duration / args.tries for i in range(args.tries)]
    written = [] # the content of each file the check put in vendor/edm: each must stay somewhere
    failures, endings, lost_any = 0, [], False
    for number, moment in enumerate(moments, 1):
        user_file = os.path.join(tree, USER_FILE)
        if not os.path.exists(user_file): # a rebuild that finished moved it aside with the old tree: a new one is at stake
            os.makedirs(os.path.dirname(user_file), exist_ok=True)
            content = f'{MARK}{number}\n'
            with open(user_file, 'w') as f:
                f.write(content)
            written.append(content)
        kind, outcome, output = interrupted_rebuild(moment)
        after, after_output = make('vendor-edm')
        second = 'up to date' if 'up to date' in after_output else 'rebuilt' if after == 0 else f'FAILED (exit {after})'
        wrong = check_trees(upstream, digest, patches)
        if after != 0:
            wrong.append(f'make vendor-edm: {after_output.strip().splitlines()[-1] if after_output.strip() else "no output"}')
        made = sorted(asides(tree) - before)
        kept = set()
        for folder in [tree] + made:
            path = os.path.join(folder, USER_FILE)
            if os.path.exists(path):
                kept.add(open(path).read())
        lost = [content for content in written if content not in kept]
        if lost:
            wrong.append(f'lost the user file written before try {lost[0][len(MARK):].strip()}')
        if kind == 'traceback':
            wrong.append('a traceback from the build')
        failures += bool(wrong)
        lost_any = lost_any or bool(lost)
        endings.append(kind)
        print(f'try {number:2}: SIGINT at {moment:.3f} s: {outcome}; then make vendor-edm: {second}; '
              f'user files kept: {len(written) - len(lost)}/{len(written)} ({len(made)} in aside folders); '
              f'{"ok" if not wrong else "WRONG: " + "; ".join(wrong)}', flush=True)
        if wrong:
            print(output + after_output, flush=True)

    # Clean up what the check made: its file in vendor/edm, and the aside folders holding its files and nothing else.
    made = sorted(asides(tree) - before)
    removed = 0
    for folder in made:
        path = os.path.join(folder, USER_FILE)
        if os.path.exists(path) and open(path).read() in written and not besides_the_checks_file(folder):
            shutil.rmtree(folder)
            removed += 1
        else:
            print(f'[vendor-interrupt-check] kept {os.path.relpath(folder, ROOT)}: it holds more than the check\'s file')
    if os.path.exists(own):
        os.remove(own)
        if not os.listdir(os.path.dirname(own)):
            os.rmdir(os.path.dirname(own))
    others = sorted((asides(tree) | asides(pristine)) - before - set(made))
    counts = ', '.join(f'{endings.count(kind)} {words}' for kind, words in ENDINGS.items() if kind in endings)
    print(f'vendor-interrupt-check: {args.tries - failures}/{args.tries} tries correct ({counts}); '
          f'{"a user file LOST" if lost_any else "every user file kept"} ({len(written)} written, {removed} aside folders found holding them and removed)'
          + (f'; other aside folders: {", ".join(os.path.relpath(p, ROOT) for p in others)}' if others else ''))
    if failures:
        sys.exit(1)


if __name__ == '__main__':
    main()
