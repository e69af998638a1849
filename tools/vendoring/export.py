"""Write the patch commits of an edited vendor/<name> back to patches/<name>/, named as in its series.

Workflow: edit vendor/<name>, fold each change into the commit of the patch it belongs to
(`git commit --fixup` + `git rebase -i --autosquash <pinned commit>`), keep the "Copy overlay files"
commit last, then run `make patches U=<name>` and read `git diff patches/`.
A new patch: add its file name to patches/<name>/series first, at the position of its commit.

Every patch file gets the same header: the zero commit, the project's From: identity and the fixed
date of the vendor commits (whoever made the commit, and when), the subject without "[PATCH]".
The commit message is the header's text: what the patch does and why, then one closing line,
`Paper: <the sections it implements>.` or `Not part of the paper's method.` (tests/test_vendor.py).
"""

import datetime
import os
import subprocess
import sys

from tools import ROOT
from tools.vendoring.upstream import GIT_DATES, VendorError, git, read_series, read_upstream, vendor_dir

PATCH_AUTHOR = 'LoRA conditioning project <noreply@example.org>'
_date = datetime.datetime.fromisoformat(GIT_DATES['GIT_AUTHOR_DATE'].replace('Z', '+00:00'))
PATCH_DATE = f'{_date:%a}, {_date.day} {_date:%b %Y %H:%M:%S %z}' # as format-patch writes dates


def uniform_header(text):
    """text (format-patch output) with From: and Date: set to PATCH_AUTHOR and PATCH_DATE."""
    header, sep, body = text.partition('\n\n')
    lines, skipping = [], False
    for line in header.split('\n'):
        if skipping and line.startswith((' ', '\t')): # a folded continuation of the replaced field
            continue
        skipping = line.startswith(('From: ', 'Date: '))
        if line.startswith('From: '):
            line = f'From: {PATCH_AUTHOR}'
        elif line.startswith('Date: '):
            line = f'Date: {PATCH_DATE}'
        lines.append(line)
    return '\n'.join(lines) + sep + body


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.split('\n')[0] + '\nusage: python -m tools.vendoring.export UPSTREAM')
    name = sys.argv[1]
    try:
        upstream = read_upstream(name)
        repo = vendor_dir(upstream)
        rel = os.path.relpath(repo, ROOT)
        if not os.path.isdir(os.path.join(repo, '.git')):
            raise VendorError(f'{rel} does not exist; run make vendor first')
        if git(repo, 'status', '--porcelain', '--untracked-files=no'): # untracked files (runs, notes) are never exported
            raise VendorError(f'{rel} has uncommitted edits: commit them into the patch they belong to first')
        if not git(repo, 'log', '-1', '--format=%s').startswith('Copy overlay files'):
            raise VendorError(f'the last commit of {rel} must be "Copy overlay files"')
        if 'extract' in upstream: # the first commit is the extracted module, the base of the patches
            commits = git(repo, 'rev-list', '--reverse', 'HEAD~1').split()[1:]
        else:
            commits = git(repo, 'rev-list', '--reverse', f'{upstream["commit"]}..HEAD~1').split()
        series = read_series(name)
        if len(commits) != len(series):
            raise VendorError(f'{rel} has {len(commits)} patch commits but patches/{name}/series lists {len(series)}')
        for commit, path in zip(commits, series):
            # Not through git(), which strips the output: a last context line can be an empty line (" ").
            result = subprocess.run(['git', '-C', repo, 'format-patch', '-1', '--stdout', '--no-signature', '--zero-commit', '--keep-subject', commit],
                                    text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if result.returncode != 0:
                raise VendorError(f'git format-patch {commit[:7]} failed in {rel}: {result.stderr.strip() or "no message"}')
            with open(path, 'w') as f:
                f.write(uniform_header(result.stdout))
            print(f'wrote {os.path.relpath(path, ROOT)}')
    except VendorError as err:
        sys.exit(f'export: {err}')


if __name__ == '__main__':
    main()
