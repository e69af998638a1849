"""What patches/<name>/ says about an upstream, and the git calls that act on it.

    patches/<name>/UPSTREAM   url, commit, licence, the vendor folder (`dir:`), where the shared
                              LoRA core goes (`core:`), the LoRA patches' line budget
                              (`lora_line_budget:`), optionally a notebook to turn into a module
                              (`extract:`) and whether to install the tree into the environment
                              (`install: editable`)
    patches/<name>/series     patch files, applied in order with `git apply`
    overlay/<name>/...        files copied to the same relative path in vendor/<dir>/
    overlay/common/lora.py    the shared LoRA core, copied to UPSTREAM's `core` path
"""

import hashlib
import os
import subprocess
import sys
import tempfile

from tools import ROOT

VENDOR_EMAIL = 'vendor@localhost' # the committer of every commit a build makes (so a build can tell the user's own)
# No background gc or maintenance: a detached git writing into a tree could outlive a build that removes it.
GIT_IDENTITY = ['-c', 'user.name=vendor', '-c', f'user.email={VENDOR_EMAIL}', '-c', 'commit.gpgsign=false', '-c', 'gc.auto=0', '-c', 'maintenance.auto=false']
# Fixed dates make the vendor commits, and so a rebuilt tree's HEAD and the exported patches, reproducible.
GIT_DATES = {'GIT_AUTHOR_DATE': '2000-01-01T00:00:00Z', 'GIT_COMMITTER_DATE': '2000-01-01T00:00:00Z'}


class VendorError(Exception):
    pass


def git(repo, *args):
    """Run git in repo with the vendor identity and dates; its stdout, stripped."""
    # The committer from the environment too: GIT_COMMITTER_* set by a user would outrank the -c options.
    env = dict(os.environ, **GIT_DATES, GIT_COMMITTER_NAME='vendor', GIT_COMMITTER_EMAIL=VENDOR_EMAIL)
    result = subprocess.run(['git', *GIT_IDENTITY, '-C', repo, *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise VendorError(f'git {" ".join(args)} failed in {os.path.relpath(repo, ROOT)}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no message"}')
    return result.stdout.strip()


def read_upstream(name):
    """Parse patches/<name>/UPSTREAM: `key: value` lines, # comments."""
    path = os.path.join(ROOT, 'patches', name, 'UPSTREAM')
    if not os.path.isfile(path):
        raise VendorError(f'unknown upstream "{name}" (known: {", ".join(upstream_names())})')
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
        paths.append(os.path.join(ROOT, 'tools', 'vendoring', 'notebook.py'))
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


def upstream_names():
    """Every upstream with a patches/<name>/UPSTREAM file, sorted."""
    top = os.path.join(ROOT, 'patches')
    return sorted(d for d in os.listdir(top) if os.path.isfile(os.path.join(top, d, 'UPSTREAM')))


def import_vendor_tree(tree, tool):
    """Put vendor/<tree> first on sys.path, to import the patched upstream in-process (its
    modules have generic names, such as EDM's `training`, so the trees are not installed). EDM and EDM2
    share those names: putting one there takes the other off, with the modules imported from it."""
    path = os.path.join(ROOT, 'vendor', tree)
    if not os.path.isdir(path):
        sys.exit(f'{tool}: vendor/{tree} is missing; run `make vendor` first')
    rival = {'edm': 'edm2', 'edm2': 'edm'}.get(tree)
    other = rival and os.path.join(ROOT, 'vendor', rival)
    if other in sys.path:
        # EDM's and EDM2's modules share names (training, dnnlib, torch_utils): one of the two at a time, or a module
        # already imported from the other tree would be taken for this one's.
        while other in sys.path:
            sys.path.remove(other)
        for name, module in list(sys.modules.items()):
            if (getattr(module, '__file__', None) or '').startswith(other + os.sep):
                del sys.modules[name]
    if path not in sys.path:
        sys.path.insert(0, path)
