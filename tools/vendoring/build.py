"""Build vendor/<dir>: the official upstream at its pinned commit, patched, with the overlay in place.

    python -m tools.vendoring.build edm               # build or check vendor/edm (make vendor-edm)
    python -m tools.vendoring.build --rebuild edm     # build it again (make vendor-edm REBUILD=1)
    python -m tools.vendoring.build --pristine edm    # also build vendor/pristine/edm (pinned, unpatched)

The inputs of each upstream are described in tools/vendoring/upstream.py. Each patch becomes one
commit in vendor/<dir> and the overlay a last commit whose message records the pinned commit and
a digest of all inputs. A second run with the same inputs changes nothing. The script refuses (one
line, exit 1) when vendor/<dir> has edits to its files or sits at another commit; files the user
added (a training-runs/ folder) are no edit. A tree built from older inputs is built again.

A tree is never half made: it is built in a folder beside it (vendor/.build-<dir>-<pid>), then
renamed into place, so that an interrupt (Ctrl-C or SIGTERM: one line, exit 130 or 143) leaves the
old tree or the new one. The old tree is deleted only when it holds nothing but what a build made;
else it is moved aside, to vendor/<dir>.old-<date>-<time>, and a line says so. The same goes for
vendor/pristine/<dir> and a notebook's clone in vendor/.upstream/<dir>. A lock (vendor/.lock-<dir>)
makes a second build of the same tree wait for the first. With --install (as `make vendor` runs
it), an upstream marked `install: editable` is put on the running environment's import path, as
`pip install -e` would, so that its own scripts import it from any folder.
"""

import signal
import sys


def stop_before_main(signum, frame):
    """Ctrl-C or kill while the modules below load: no build has begun, there is nothing to undo."""
    print('vendor: interrupted; nothing changed', file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == '__main__': # before the other imports, which take most of the start-up: no traceback from them
    signal.signal(signal.SIGINT, stop_before_main)
    signal.signal(signal.SIGTERM, stop_before_main)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402

from tools import ROOT  # noqa: E402
from tools.vendoring import notebook  # noqa: E402
from tools.vendoring.upstream import (VENDOR_EMAIL, VendorError, git, inputs_digest, patch_header, read_series, read_upstream,  # noqa: E402
                                      overlay_files, vendor_dir)

SIGNALS = {signal.SIGINT, signal.SIGTERM}
# What this run has changed, for the line an interrupt ends with: the folders being made, and those swapped in.
progress = {'making': [], 'swapped': []}


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised wherever the build is, so that its cleanup runs on the way out (a
    BaseException, as KeyboardInterrupt is: no `except Exception` on the way catches it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def on_signal(signum, frame):
    for other in SIGNALS: # once: a second signal must not cut short the cleanup this one starts
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def rebuild_hint(name):
    """What to type to start over: the make target, since that is what users run."""
    return f'`make vendor-{name} REBUILD=1` builds it again, moving anything of yours in it aside'


@contextlib.contextmanager
def signals_blocked():
    """SIGINT and SIGTERM wait, pending, until the block ends, so that what runs inside is never cut
    in two. No process may start inside: it would inherit the block."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextlib.contextmanager
def locked(upstream):
    """Hold vendor/.lock-<dir> (the OS releases it when the process ends, however it ends): a second
    build of the same tree waits for the first, then finds it built, instead of colliding with it."""
    path = os.path.join(ROOT, 'vendor', f'.lock-{upstream["dir"]}')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f'vendor/{upstream["dir"]}: another build of it is running; waiting for it to end', flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def beside(dest, kind):
    """A folder next to dest (on its file system, so that a rename moves it) that only this process uses."""
    return os.path.join(os.path.dirname(dest), f'.{kind}-{os.path.basename(dest)}-{os.getpid()}')


def remove_tree(path, seconds=5):
    """shutil.rmtree, tried again while a process that was just stopped (its files still closing) may
    still add to it; what is left, the next run's remove_leftovers takes."""
    deadline = time.monotonic() + seconds
    shutil.rmtree(path, ignore_errors=True)
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
        shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(dest):
    """Delete the build and trash folders beside dest that an interrupted or killed run left: they are
    the tool's own, and no other run is using them while this one holds the lock."""
    folder, base = os.path.split(dest)
    pattern = re.compile(rf'\.(build|trash)-{re.escape(base)}-\d+')
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if pattern.fullmatch(entry):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def users_work(tree, upstream):
    """What tree holds that no build made, in a few words; '' if nothing, so that it may be deleted.
    Python's caches (__pycache__/, *.pyc) do not count: importing the tree's modules writes them."""
    if not os.path.isdir(os.path.join(tree, '.git')):
        return 'files outside git' if os.listdir(tree) else ''
    try:
        status = git(tree, 'status', '--porcelain', '--untracked-files=all', '--ignored')
        # A build commits as VENDOR_EMAIL; the upstream's own commits are the pinned one and before it.
        committers = git(tree, 'log', '--format=%ce', 'HEAD' if 'extract' in upstream else f'{upstream["commit"]}..HEAD').split()
        stashed = git(tree, 'stash', 'list')
    except VendorError:
        return 'a checkout that git cannot read'
    lines = [line for line in status.splitlines() if '__pycache__/' not in line and not line.rstrip('"').endswith('.pyc')]
    added = [line[3:] for line in lines if line.startswith(('??', '!!'))]
    work = []
    if len(added) < len(lines):
        work.append('edits')
    if added:
        work.append(f'untracked files ({added[0]}' + (f' and {len(added) - 1} more)' if len(added) > 1 else ')'))
    if any(committer != VENDOR_EMAIL for committer in committers):
        work.append('commits of your own')
    if stashed:
        work.append('stashed changes')
    return ', '.join(work)


def aside_name(dest):
    """<dest>.old-<date>-<time>, the first such name that is free."""
    stamp = time.strftime('%Y%m%d-%H%M%S')
    path, n = f'{dest}.old-{stamp}', 1
    while os.path.exists(path):
        n += 1
        path = f'{dest}.old-{stamp}-{n}'
    return path


def swap_in(new, dest, upstream):
    """Rename the folder new to dest. An old dest that holds anything of the user's goes aside under a
    dated name, which a line gives; else it is deleted."""
    rel = os.path.relpath(dest, ROOT)
    work = users_work(dest, upstream) if os.path.exists(dest) else ''
    old = aside_name(dest) if work else beside(dest, 'trash')
    with signals_blocked(): # both renames or neither, and the line saying where the old tree went
        if os.path.exists(dest):
            os.rename(dest, old)
            if work:
                print(f'{rel}: the old tree held {work}; moved to {os.path.relpath(old, ROOT)}', flush=True)
        os.rename(new, dest)
        progress['swapped'].append(dest)
    if not work:
        shutil.rmtree(old, ignore_errors=True) # if interrupted, the next run removes the rest
    return old if work else None


def make_atomically(dest, make, upstream):
    """make(folder) builds dest's new content in a folder beside dest, which then replaces it
    (swap_in): at any moment dest is the old tree or the new one, never a half-made one."""
    new = beside(dest, 'build')
    progress['making'].append(dest)
    try:
        make(new)
        swap_in(new, dest, upstream)
    except BaseException: # a failed or interrupted build leaves nothing, and a second Ctrl-C cannot cut that short
        with signals_blocked():
            remove_tree(new)
        raise
    progress['making'].remove(dest)


def state_of(dest, upstream, digest, name):
    """'missing', 'current' or 'stale'; raises VendorError for states that must not be touched.
    Untracked files are the user's (runs, notes): they do not make a tree stale or edited."""
    rel = os.path.relpath(dest, ROOT)
    if not os.path.exists(dest):
        return 'missing'
    if not os.path.isdir(os.path.join(dest, '.git')):
        raise VendorError(f'{rel} exists but is not a git checkout; {rebuild_hint(name)}')
    if git(dest, 'status', '--porcelain', '--untracked-files=no'):
        raise VendorError(f'{rel} has local edits (`git -C {rel} status`): commit them and `make patches U={name}` keeps them as patches, '
                          f'or `make vendor-{name} REBUILD=1` builds it again, moving the edited tree aside')
    message = git(dest, 'log', '-1', '--format=%B')
    recorded = dict(line.split(': ', 1) for line in message.splitlines() if line.startswith(('Upstream-Commit: ', 'Inputs-Digest: ')))
    if recorded.get('Upstream-Commit') != upstream['commit']:
        head = git(dest, 'rev-parse', '--short', 'HEAD')
        raise VendorError(f'{rel} sits at commit {head}, not the patched pinned commit {upstream["commit"][:7]}; {rebuild_hint(name)}')
    return 'current' if recorded.get('Inputs-Digest') == digest else 'stale'


def clone(url, dest, shown):
    """git clone url into dest; shown: the folder the messages name (dest is a build folder beside it)."""
    print(f'{shown}: cloning {url}')
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    result = subprocess.run(['git', 'clone', '-q', '--no-checkout', url, dest], text=True, stderr=subprocess.PIPE)
    if result.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise VendorError(f'cannot clone {url}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no message"} (offline? see README, "Offline use")')


def require_commit(repo, upstream):
    try:
        git(repo, 'cat-file', '-e', upstream['commit'] + '^{commit}')
    except VendorError:
        raise VendorError(f'{upstream["url"]} has no commit {upstream["commit"]}') from None


def clone_pinned(upstream, dest, shown):
    """dest: a clone that holds the pinned commit; a local one when vendor/<dir> or its pristine tree
    has the commit (git hardlinks the objects: fast and offline; --dissociate copies any it borrows),
    else one from the upstream's URL."""
    for local in [vendor_dir(upstream), vendor_dir(upstream, pristine=True)]:
        if not os.path.isdir(os.path.join(local, '.git')):
            continue
        try:
            require_commit(local, upstream)
        except VendorError:
            continue
        result = subprocess.run(['git', 'clone', '-q', '--no-checkout', '--dissociate', local, dest], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if result.returncode == 0:
            git(dest, 'remote', 'set-url', 'origin', upstream['url']) # as if cloned from the URL
            return
        shutil.rmtree(dest, ignore_errors=True)
    clone(upstream['url'], dest, shown)
    require_commit(dest, upstream)


def upstream_clone(upstream):
    """vendor/.upstream/<dir>: a notebook upstream's clone, which its trees are extracted from."""
    return os.path.join(ROOT, 'vendor', '.upstream', upstream['dir'])


def prepare_base(dest, upstream, shown):
    """Make dest the tree the patches apply to (shown: the folder the messages name).

    A code upstream: its clone, checked out at the pinned commit. A notebook upstream (`extract:`):
    a new repository whose first commit is the module tools/vendoring/notebook.py makes from the
    notebook at the pinned commit, read from a clone in vendor/.upstream/ (never checked out).
    """
    if 'extract' not in upstream:
        clone_pinned(upstream, dest, shown)
        git(dest, 'checkout', '-q', '--force', '--detach', upstream['commit'])
        return
    source = upstream_clone(upstream)
    if not os.path.exists(source):
        make_atomically(source, lambda new: clone(upstream['url'], new, os.path.relpath(source, ROOT)), upstream)
    require_commit(source, upstream)
    notebook_path, module = [part.strip() for part in upstream['extract'].split('->')]
    os.makedirs(dest)
    git(dest, 'init', '-q')
    try:
        text = notebook.extract(json.loads(git(source, 'show', f'{upstream["commit"]}:{notebook_path}')), notebook_path)
    except (ValueError, KeyError, SyntaxError) as err:
        raise VendorError(f'cannot extract {module} from {notebook_path}: {err}') from None
    with open(os.path.join(dest, module), 'w') as f:
        f.write(text)
    git(dest, 'add', module)
    git(dest, 'commit', '-q', '-m', f'Extract {module} from {notebook_path}\n\n{upstream["url"]} at {upstream["commit"]},\nby tools/vendoring/notebook.py.\n\nUpstream-Commit: {upstream["commit"]}')


def is_base(dest, upstream):
    """Is dest exactly what prepare_base() makes?"""
    if 'extract' in upstream:
        return git(dest, 'rev-list', '--count', 'HEAD') == '1' and f'Upstream-Commit: {upstream["commit"]}' in git(dest, 'log', '-1', '--format=%B')
    return git(dest, 'rev-parse', 'HEAD') == upstream['commit']


def build(name, upstream, new, digest):
    """Build vendor/<dir>'s new tree in the folder new."""
    rel = os.path.relpath(vendor_dir(upstream), ROOT)
    prepare_base(new, upstream, rel)
    for patch in read_series(name):
        try:
            git(new, 'apply', '--index', '--whitespace=nowarn', patch)
        except VendorError as err:
            raise VendorError(f'patch {os.path.relpath(patch, ROOT)} does not apply to {upstream["commit"][:7]}: {err}') from None
        author, email, message = patch_header(patch)
        git(new, 'commit', '-q', f'--author={author} <{email}>', '-m', message)
        print(f'{rel}: applied {os.path.basename(patch)}')
    for source, relative in overlay_files(name, upstream):
        target = os.path.join(new, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
    git(new, 'add', '-A')
    git(new, 'commit', '-q', '--allow-empty', '-m', f'Copy overlay files\n\nUpstream-Commit: {upstream["commit"]}\nInputs-Digest: {digest}')
    print(f'{rel}: overlay copied; ready at {upstream["commit"][:7]} + {len(read_series(name))} patches')


def is_pristine(dest, upstream):
    try:
        return os.path.isdir(os.path.join(dest, '.git')) and is_base(dest, upstream) and not git(dest, 'status', '--porcelain', '--untracked-files=no')
    except VendorError:
        return False


def build_pristine(name, upstream, fresh):
    """vendor/pristine/<dir>: the pinned commit untouched (for a notebook: the extracted module
    alone), cloned from vendor/<dir>. fresh: make it again, even if it looks right."""
    dest = vendor_dir(upstream, pristine=True)
    rel = os.path.relpath(dest, ROOT)
    # Older versions cloned it with --shared: it borrows the objects of vendor/<dir>, which a rebuild moves away.
    fresh = fresh or os.path.exists(os.path.join(dest, '.git', 'objects', 'info', 'alternates'))
    if os.path.exists(dest) and not fresh:
        if is_pristine(dest, upstream):
            return
        raise VendorError(f'{rel} is not the untouched pinned commit; {rebuild_hint(name)}')

    def make(new):
        if 'extract' in upstream:
            prepare_base(new, upstream, rel)
        else:
            clone_pinned(upstream, new, rel)
            git(new, 'checkout', '-q', '--detach', upstream['commit'])
    make_atomically(dest, make, upstream)
    print(f'{rel}: pristine {upstream["commit"][:7]}')


def install(upstream):
    """Put vendor/<dir> on the running environment's import path, as `pip install -e` would, so that
    the upstream's own scripts import its package from any folder. A .pth file rather than pip: pip
    would write build files into the vendor tree, which must stay clean. It names the folder, so a
    rebuilt tree needs no second install."""
    if sys.prefix == sys.base_prefix:
        print(f'vendor/{upstream["dir"]}: not installed (not running in a virtual environment); use PYTHONPATH')
        return
    path = os.path.join(sysconfig.get_paths()['purelib'], f'vendor-{upstream["dir"]}.pth')
    line = vendor_dir(upstream) + '\n'
    if not os.path.exists(path) or open(path).read() != line:
        with open(path, 'w') as f:
            f.write(line)
        print(f'vendor/{upstream["dir"]}: on the import path of {sys.prefix}')


def vendor(name, upstream, rebuild, pristine, editable):
    """Build or check vendor/<dir> (and its pristine tree, its install), holding its lock."""
    dest = vendor_dir(upstream)
    for folder in [dest, vendor_dir(upstream, pristine=True), upstream_clone(upstream)]:
        remove_leftovers(folder)
    digest = inputs_digest(name, upstream)
    state = 'rebuild' if rebuild else state_of(dest, upstream, digest, name)
    if state == 'current':
        print(f'vendor/{upstream["dir"]}: up to date ({upstream["commit"][:7]} + {len(read_series(name))} patches + overlay)')
    else:
        if state == 'stale':
            print(f'vendor/{upstream["dir"]}: patches or overlay changed; rebuilding the tree')
        make_atomically(dest, lambda new: build(name, upstream, new, digest), upstream)
    if editable and upstream.get('install') == 'editable':
        install(upstream)
    # The pristine tree starts over with the tree; a notebook's also when the tree is stale, since it is made
    # by the extraction, which may have changed too. One there from before is kept in step even without --pristine.
    fresh = state == 'rebuild' or (state == 'stale' and 'extract' in upstream)
    if pristine or (fresh and os.path.exists(vendor_dir(upstream, pristine=True))):
        build_pristine(name, upstream, fresh)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('names', nargs='+', metavar='UPSTREAM', help='upstream names, as under patches/')
    parser.add_argument('--rebuild', action='store_true', help='build vendor/<name> again; an old tree holding anything of yours is moved aside, not deleted')
    parser.add_argument('--pristine', action='store_true', help='also provide vendor/pristine/<name>, the unpatched pinned commit (tests compare against it)')
    parser.add_argument('--install', action='store_true', help='put upstreams marked `install: editable` on the running environment\'s import path')
    args = parser.parse_args()
    for signum in SIGNALS: # from here an interrupt ends in main's one line, once the build folder is removed
        signal.signal(signum, on_signal)
    try:
        for name in args.names:
            upstream = read_upstream(name)
            with locked(upstream):
                vendor(name, upstream, args.rebuild, args.pristine, args.install)
    except VendorError as err:
        print(f'vendor: {err}', file=sys.stderr)
        sys.exit(1)
    except Interrupted as stop:
        said = [f'{os.path.relpath(path, ROOT)} is rebuilt' for path in progress['swapped']]
        said += [f'{os.path.relpath(path, ROOT)} is unchanged' for path in progress['making'] if path not in progress['swapped']]
        print(f'vendor: interrupted; {", ".join(said) or "nothing changed"}', file=sys.stderr)
        sys.exit(128 + stop.signum)


if __name__ == '__main__':
    main()
