#!/usr/bin/env python3
"""Build vendor/<dir>: the official upstream at its pinned commit, patched, with the overlay in place.

    python tools/vendor.py edm                # build or check vendor/edm
    python tools/vendor.py --rebuild edm      # start over, discarding vendor/edm
    python tools/vendor.py --pristine edm     # also build vendor/pristine/edm (pinned, unpatched)

Inputs, per upstream (see patches/<name>/UPSTREAM):
    patches/<name>/UPSTREAM   url, commit, licence, the vendor folder, where the shared LoRA core goes;
                              optionally `extract:` (a notebook to turn into a module, with
                              tools/extract_notebook.py, before the patches)
    patches/<name>/series     patch files, applied in order with `git apply`
    overlay/<name>/...        files copied to the same relative path in vendor/<dir>/
    overlay/common/lora.py    the shared LoRA core, copied to UPSTREAM's `core` path

Each patch becomes one commit in vendor/<dir> and the overlay a last commit whose message records
the pinned commit and a digest of all inputs. A second run with the same inputs changes nothing.
The script refuses (one line, exit 1) when vendor/<dir> has local edits or sits at another commit;
a clean tree built from older inputs is rebuilt in place, since nothing can be lost.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIT_IDENTITY = ['-c', 'user.name=vendor', '-c', 'user.email=vendor@localhost', '-c', 'commit.gpgsign=false']
# Fixed dates make the vendor commits, and so a rebuilt tree's HEAD, reproducible.
GIT_DATES = {'GIT_AUTHOR_DATE': '2000-01-01T00:00:00Z', 'GIT_COMMITTER_DATE': '2000-01-01T00:00:00Z'}


class VendorError(Exception):
    pass


def git(repo, *args):
    """Run git in repo with the vendor identity and dates; its stdout, stripped."""
    env = dict(os.environ, **GIT_DATES)
    result = subprocess.run(['git', *GIT_IDENTITY, '-C', repo, *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise VendorError(f'git {" ".join(args)} failed in {os.path.relpath(repo, ROOT)}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no message"}')
    return result.stdout.strip()


def read_upstream(name):
    """Parse patches/<name>/UPSTREAM: `key: value` lines, # comments."""
    path = os.path.join(ROOT, 'patches', name, 'UPSTREAM')
    if not os.path.isfile(path):
        known = sorted(d for d in os.listdir(os.path.join(ROOT, 'patches')) if os.path.isfile(os.path.join(ROOT, 'patches', d, 'UPSTREAM')))
        raise VendorError(f'unknown upstream "{name}" (known: {", ".join(known)})')
    fields = {}
    with open(path) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                key, value = line.split(':', 1)
                fields[key.strip()] = value.strip()
    for key in ['url', 'commit', 'licence']:
        if key not in fields:
            raise VendorError(f'{os.path.relpath(path, ROOT)} lacks "{key}:"')
    fields.setdefault('dir', name) # vendor/<dir>, named after the upstream repository
    return fields


def vendor_dir(upstream, pristine=False):
    return os.path.join(ROOT, 'vendor', *(['pristine'] if pristine else []), upstream['dir'])


def read_series(name):
    path = os.path.join(ROOT, 'patches', name, 'series')
    with open(path) as f:
        names = [line.split('#', 1)[0].strip() for line in f]
    return [os.path.join(ROOT, 'patches', name, n) for n in names if n]


def overlay_files(name, upstream):
    """(source, destination relative to vendor/<dir>) for every overlay file of this upstream."""
    pairs = []
    if 'core' in upstream:
        pairs.append((os.path.join(ROOT, 'overlay', 'common', 'lora.py'), upstream['core']))
    top = os.path.join(ROOT, 'overlay', name)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d != '__pycache__')
        for filename in sorted(filenames):
            source = os.path.join(dirpath, filename)
            pairs.append((source, os.path.relpath(source, top)))
    return pairs


def inputs_digest(name, upstream):
    """sha256 over everything that decides the vendor tree's content."""
    h = hashlib.sha256()
    paths = [os.path.join(ROOT, 'patches', name, 'UPSTREAM'), os.path.join(ROOT, 'patches', name, 'series')]
    paths += read_series(name)
    paths += [source for source, _ in overlay_files(name, upstream)]
    if 'extract' in upstream:
        paths.append(os.path.join(ROOT, 'tools', 'extract_notebook.py'))
    for path in paths:
        h.update(os.path.relpath(path, ROOT).encode() + b'\0')
        with open(path, 'rb') as f:
            h.update(f.read())
    return h.hexdigest()


def patch_header(path):
    """(author name, author email, commit message) of a format-patch file, as `git mailinfo` reads them."""
    with open(path, 'rb') as patch, tempfile.TemporaryDirectory() as tmp:
        info = subprocess.run(['git', 'mailinfo', '-k', os.path.join(tmp, 'msg'), os.path.join(tmp, 'diff')],
                              stdin=patch, stdout=subprocess.PIPE, text=True, check=True).stdout
        with open(os.path.join(tmp, 'msg')) as f:
            body = f.read().strip()
    fields = dict(line.split(': ', 1) for line in info.splitlines() if ': ' in line)
    subject = fields.get('Subject', os.path.basename(path)).replace('[PATCH]', '').strip()
    message = f'{subject}\n\n{body}' if body else subject
    return fields.get('Author', 'vendor'), fields.get('Email', 'vendor@localhost'), message


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
    a new repository whose first commit is the module tools/extract_notebook.py makes from the
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
    notebook, module = [part.strip() for part in upstream['extract'].split('->')]
    shutil.rmtree(dest, ignore_errors=True) # rebuilt from scratch: it only ever holds generated files
    os.makedirs(dest)
    git(dest, 'init', '-q')
    with tempfile.TemporaryDirectory() as tmp:
        notebook_copy = os.path.join(tmp, os.path.basename(notebook))
        with open(notebook_copy, 'w') as f:
            f.write(git(source, 'show', f'{upstream["commit"]}:{notebook}'))
        result = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'extract_notebook.py'), notebook_copy, os.path.join(dest, module)],
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise VendorError(f'cannot extract {module} from {notebook}: {result.stdout.strip().splitlines()[-1]}')
    git(dest, 'add', module)
    git(dest, 'commit', '-q', '-m', f'Extract {module} from {notebook}\n\n{upstream["url"]} at {upstream["commit"]},\nby tools/extract_notebook.py.\n\nUpstream-Commit: {upstream["commit"]}')


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('names', nargs='+', metavar='UPSTREAM', help='upstream names, as under patches/')
    parser.add_argument('--rebuild', action='store_true', help='delete vendor/<name> (local edits included) and build it again')
    parser.add_argument('--pristine', action='store_true', help='also provide vendor/pristine/<name>, the unpatched pinned commit (tests compare against it)')
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
                build(name, upstream, dest, digest)
            if args.pristine:
                build_pristine(upstream)
    except VendorError as err:
        print(f'vendor: {err}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
