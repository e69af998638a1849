"""Build vendor/<dir>: the official upstream at its pinned commit, patched, with the overlay in place.

    python -m tools.vendoring.build edm               # build or check vendor/edm
    python -m tools.vendoring.build --rebuild edm     # start over, discarding vendor/edm
    python -m tools.vendoring.build --pristine edm    # also build vendor/pristine/edm (pinned, unpatched)

The inputs of each upstream are described in tools/vendoring/upstream.py. Each patch becomes one
commit in vendor/<dir> and the overlay a last commit whose message records the pinned commit and
a digest of all inputs. A second run with the same inputs changes nothing. The script refuses (one
line, exit 1) when vendor/<dir> has local edits or sits at another commit; a clean tree built from
older inputs is rebuilt in place, since nothing can be lost. With --install (as `make vendor` runs
it), an upstream marked `install: editable` is put on the running environment's import path, as
`pip install -e` would, so that its own scripts import it from any folder.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig

from tools import ROOT
from tools.vendoring import notebook
from tools.vendoring.upstream import (VendorError, git, inputs_digest, patch_header, read_series, read_upstream,
                                      overlay_files, vendor_dir)


def state_of(dest, upstream, digest):
    """'missing', 'current' or 'stale'; raises VendorError for states that must not be touched."""
    rel = os.path.relpath(dest, ROOT)
    if not os.path.exists(dest):
        return 'missing'
    if not os.path.isdir(os.path.join(dest, '.git')):
        raise VendorError(f'{rel} exists but is not a git checkout; run with --rebuild to start over')
    if git(dest, 'status', '--porcelain', '--untracked-files=normal'):
        raise VendorError(f'{rel} has local edits (see `git -C {rel} status`); keep them elsewhere, then run with --rebuild')
    message = git(dest, 'log', '-1', '--format=%B')
    recorded = dict(line.split(': ', 1) for line in message.splitlines() if line.startswith(('Upstream-Commit: ', 'Inputs-Digest: ')))
    if recorded.get('Upstream-Commit') != upstream['commit']:
        head = git(dest, 'rev-parse', '--short', 'HEAD')
        raise VendorError(f'{rel} sits at commit {head}, not the patched pinned commit {upstream["commit"][:7]}; run with --rebuild to start over')
    return 'current' if recorded.get('Inputs-Digest') == digest else 'stale'


def clone(url, dest):
    rel = os.path.relpath(dest, ROOT)
    print(f'{rel}: cloning {url}')
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


def prepare_base(dest, upstream):
    """Make dest the tree the patches apply to.

    A code upstream: its clone, checked out at the pinned commit. A notebook upstream (`extract:`):
    a new repository whose first commit is the module tools/vendoring/notebook.py makes from the
    notebook at the pinned commit, read from a clone in vendor/.upstream/ (never checked out).
    """
    if 'extract' not in upstream:
        if not os.path.exists(dest):
            clone(upstream['url'], dest)
        require_commit(dest, upstream)
        git(dest, 'checkout', '-q', '--force', '--detach', upstream['commit'])
        git(dest, 'clean', '-q', '-fdx')
        return
    source = os.path.join(ROOT, 'vendor', '.upstream', upstream['dir'])
    if not os.path.exists(source):
        clone(upstream['url'], source)
    require_commit(source, upstream)
    notebook_path, module = [part.strip() for part in upstream['extract'].split('->')]
    shutil.rmtree(dest, ignore_errors=True) # rebuilt from scratch: it only ever holds generated files
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


def build(name, upstream, dest, digest):
    rel = os.path.relpath(dest, ROOT)
    prepare_base(dest, upstream)
    for patch in read_series(name):
        try:
            git(dest, 'apply', '--index', '--whitespace=nowarn', patch)
        except VendorError as err:
            raise VendorError(f'patch {os.path.relpath(patch, ROOT)} does not apply to {upstream["commit"][:7]}: {err}') from None
        author, email, message = patch_header(patch)
        git(dest, 'commit', '-q', f'--author={author} <{email}>', '-m', message)
        print(f'{rel}: applied {os.path.basename(patch)}')
    for source, relative in overlay_files(name, upstream):
        target = os.path.join(dest, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
    git(dest, 'add', '-A')
    git(dest, 'commit', '-q', '--allow-empty', '-m', f'Copy overlay files\n\nUpstream-Commit: {upstream["commit"]}\nInputs-Digest: {digest}')
    print(f'{rel}: overlay copied; ready at {upstream["commit"][:7]} + {len(read_series(name))} patches')


def build_pristine(upstream):
    """vendor/pristine/<dir>: the pinned commit untouched (for a notebook: the extracted module
    alone), cloned from vendor/<dir>'s objects."""
    source = vendor_dir(upstream)
    dest = vendor_dir(upstream, pristine=True)
    rel = os.path.relpath(dest, ROOT)
    if os.path.isdir(os.path.join(dest, '.git')):
        if is_base(dest, upstream) and not git(dest, 'status', '--porcelain'):
            return
        raise VendorError(f'{rel} is not the untouched pinned commit; run with --rebuild to start over')
    if 'extract' in upstream:
        prepare_base(dest, upstream)
    else:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        subprocess.run(['git', 'clone', '-q', '--shared', '--no-checkout', source, dest], check=True)
        git(dest, 'checkout', '-q', '--detach', upstream['commit'])
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('names', nargs='+', metavar='UPSTREAM', help='upstream names, as under patches/')
    parser.add_argument('--rebuild', action='store_true', help='delete vendor/<name> (local edits included) and build it again')
    parser.add_argument('--pristine', action='store_true', help='also provide vendor/pristine/<name>, the unpatched pinned commit (tests compare against it)')
    parser.add_argument('--install', action='store_true', help='put upstreams marked `install: editable` on the running environment\'s import path')
    args = parser.parse_args()
    try:
        for name in args.names:
            upstream = read_upstream(name)
            dest = vendor_dir(upstream)
            digest = inputs_digest(name, upstream)
            if args.rebuild:
                shutil.rmtree(dest, ignore_errors=True)
                shutil.rmtree(vendor_dir(upstream, pristine=True), ignore_errors=True)
            state = state_of(dest, upstream, digest)
            if state == 'current':
                print(f'vendor/{upstream["dir"]}: up to date ({upstream["commit"][:7]} + {len(read_series(name))} patches + overlay)')
            else:
                if state == 'stale':
                    print(f'vendor/{upstream["dir"]}: patches or overlay changed; rebuilding the clean tree')
                    if 'extract' in upstream: # its pristine tree is made by the extraction, which may have changed too
                        shutil.rmtree(vendor_dir(upstream, pristine=True), ignore_errors=True)
                build(name, upstream, dest, digest)
            if args.install and upstream.get('install') == 'editable':
                install(upstream)
            if args.pristine:
                build_pristine(upstream)
    except VendorError as err:
        print(f'vendor: {err}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
