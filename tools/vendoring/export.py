"""Write the patch commits of an edited vendor/<name> back to patches/<name>/, named as in its series.

Workflow: edit vendor/<name>, fold each change into the commit of the patch it belongs to
(`git commit --fixup` + `git rebase -i --autosquash <pinned commit>`), keep the "Copy overlay files"
commit last, then run `make patches U=<name>` and read `git diff patches/`.
A new patch: add its file name to patches/<name>/series first, at the position of its commit.
"""

import os
import sys

from tools import ROOT
from tools.vendoring.upstream import VendorError, git, read_series, read_upstream, vendor_dir


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
        if git(repo, 'status', '--porcelain'):
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
            text = git(repo, 'format-patch', '-1', '--stdout', '--no-signature', '--zero-commit', '--keep-subject', commit)
            with open(path, 'w') as f:
                f.write(text + '\n')
            print(f'wrote {os.path.relpath(path, ROOT)}')
    except VendorError as err:
        sys.exit(f'export: {err}')


if __name__ == '__main__':
    main()
