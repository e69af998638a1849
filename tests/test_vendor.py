"""tools/vendoring/build.py on a copy of the project: build, idempotence, each refusal, the user's files
and interrupts."""

import fcntl
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, tool
from tools.vendoring.upstream import patch_header, read_series, read_upstream, upstream_names


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    copy = tmp_path_factory.mktemp('project')
    for name in ['tools', 'patches', 'overlay']:
        shutil.copytree(os.path.join(ROOT, name), copy / name, ignore=shutil.ignore_patterns('__pycache__'))
    return copy


def vendor(project, *args):
    return tool('vendoring.build', *args, cwd=project)


def git(repo, *args):
    return subprocess.run(['git', '-C', str(repo), *args], text=True, stdout=subprocess.PIPE, check=True).stdout.strip()


def assert_refused(result, reason):
    assert result.returncode == 1
    assert result.stderr.count('\n') == 1 and reason in result.stderr, result.stderr


def assert_names_the_make_command(result):
    """Users run make: a message names what they type, not the script's flag."""
    assert 'make vendor-edm REBUILD=1' in result.stderr and '--rebuild' not in result.stderr, result.stderr


def asides(project):
    """The old trees a rebuild moved aside, as it says: vendor/edm.old-<date>-<time>."""
    return sorted((project / 'vendor').glob('edm.old-*'))


def test_build_then_idempotent(project):
    first = vendor(project, 'edm')
    assert first.returncode == 0, first.stderr
    tree = project / 'vendor' / 'edm'
    head = git(tree, 'rev-parse', 'HEAD')
    # The patched tree is the pinned commit plus the series plus the overlay, nothing else.
    pinned, patches = read_upstream('edm')['commit'], read_series('edm')
    assert git(tree, 'rev-list', '--count', f'{pinned}..HEAD') == str(len(patches) + 1)
    assert (tree / 'training' / 'lora.py').read_text() == (project / 'overlay' / 'common' / 'lora.py').read_text()
    assert (tree / 'training' / 'lora_edm.py').exists()

    second = vendor(project, 'edm')
    assert second.returncode == 0 and 'up to date' in second.stdout
    assert git(tree, 'rev-parse', 'HEAD') == head and git(tree, 'status', '--porcelain') == ''


def test_refuses_local_edits(project):
    edited = project / 'vendor' / 'edm' / 'train.py'
    original = edited.read_text()
    edited.write_text(original + '# a local experiment\n')
    result = vendor(project, 'edm')
    assert_refused(result, 'has local edits')
    assert_names_the_make_command(result)
    assert 'make patches U=edm' in result.stderr
    assert edited.read_text().endswith('# a local experiment\n'), 'nothing of the user was touched'
    edited.write_text(original)


def test_refuses_another_commit(project):
    tree = project / 'vendor' / 'edm'
    head = git(tree, 'rev-parse', 'HEAD')
    git(tree, 'checkout', '-q', 'HEAD~1')
    result = vendor(project, 'edm')
    assert_refused(result, 'sits at commit')
    assert_names_the_make_command(result)
    git(tree, 'checkout', '-q', head)


def test_the_users_untracked_files_are_no_edit_and_a_rebuild_moves_them_aside(project):
    tree = project / 'vendor' / 'edm'
    snapshot = tree / 'training-runs' / '00000-cifar10' / 'network-snapshot-000001.pkl'
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text("the user's snapshot")
    used = vendor(project, 'edm')
    assert used.returncode == 0 and 'up to date' in used.stdout, used.stderr
    exported = tool('vendoring.export', 'edm', cwd=project) # make patches: untracked files are never exported
    assert exported.returncode == 0 and snapshot.exists(), exported.stderr

    rebuilt = vendor(project, 'edm', '--rebuild', '--pristine')
    assert rebuilt.returncode == 0, rebuilt.stderr
    [aside] = asides(project)
    assert (aside / snapshot.relative_to(tree)).read_text() == "the user's snapshot"
    assert f'untracked files (training-runs/00000-cifar10/network-snapshot-000001.pkl); moved to vendor/{aside.name}' in rebuilt.stdout
    assert git(tree, 'status', '--porcelain', '--ignored') == '' and 'up to date' in vendor(project, 'edm').stdout
    assert not (project / 'vendor' / 'pristine' / 'edm' / '.git' / 'objects' / 'info' / 'alternates').exists(), \
        'the pristine tree is a clone of its own, not one borrowing the objects of vendor/edm, which moves'

    # A tree holding only what a build made (and Python's caches) is deleted, not kept.
    (tree / 'training' / '__pycache__').mkdir()
    (tree / 'training' / '__pycache__' / 'lora.cpython-311.pyc').write_bytes(b'')
    again = vendor(project, 'edm', '--rebuild')
    assert again.returncode == 0 and 'moved' not in again.stdout and asides(project) == [aside], again.stdout
    shutil.rmtree(aside)


def test_a_stale_tree_with_the_users_files_is_rebuilt_and_moved_aside(project):
    tree = project / 'vendor' / 'edm'
    (tree / 'notes.txt').write_text('mine')
    core = project / 'overlay' / 'common' / 'lora.py'
    original = core.read_text()
    core.write_text(original + '\n# changed\n')
    result = vendor(project, 'edm')
    core.write_text(original)
    assert result.returncode == 0 and 'rebuilding' in result.stdout, result.stderr
    [aside] = asides(project)
    assert (aside / 'notes.txt').read_text() == 'mine' and f'moved to vendor/{aside.name}' in result.stdout
    assert not (tree / 'notes.txt').exists() and (tree / 'training' / 'lora.py').read_text().endswith('# changed\n')
    assert vendor(project, 'edm').returncode == 0 and asides(project) == [aside]
    shutil.rmtree(aside)


@pytest.mark.parametrize('signal_name, code', [('INT', 130), ('TERM', 143)])
def test_an_interrupted_rebuild_leaves_the_old_tree(project, tmp_path, signal_name, code):
    """Ctrl-C or kill while the patches apply (a git that signals the build as it applies the third):
    one line, the old tree as it was, no build folder left, and the next run finds the tree up to date."""
    tree = project / 'vendor' / 'edm'
    head = git(tree, 'rev-parse', 'HEAD')
    third = os.path.basename(read_series('edm')[2])
    (tmp_path / 'git').write_text(f'#!/bin/sh\ncase "$*" in *{third}*) kill -{signal_name} $PPID;; esac\nexec {shutil.which("git")} "$@"\n')
    (tmp_path / 'git').chmod(0o755)
    (project / 'vendor' / '.build-edm-99999').mkdir() # what a run killed with SIGKILL leaves
    result = subprocess.run([sys.executable, '-m', 'tools.vendoring.build', 'edm', '--rebuild'], cwd=project, text=True, capture_output=True,
                            env=dict(os.environ, PATH=f'{tmp_path}{os.pathsep}{os.environ["PATH"]}'))
    assert result.returncode == code and result.stderr == 'vendor: interrupted; vendor/edm is unchanged\n', result.stderr
    assert 'applied' in result.stdout, 'the signal came while the patches applied'
    assert git(tree, 'rev-parse', 'HEAD') == head and git(tree, 'status', '--porcelain', '--ignored') == ''
    assert not [name for name in os.listdir(project / 'vendor') if name.startswith('.build-')]
    assert 'up to date' in vendor(project, 'edm').stdout


def test_a_second_build_of_the_same_tree_waits_for_the_first(project):
    with open(project / 'vendor' / '.lock-edm', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX) # as a running build holds it
        second = subprocess.Popen([sys.executable, '-m', 'tools.vendoring.build', 'edm'], cwd=project, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert 'another build of it is running; waiting' in second.stdout.readline()
        assert second.poll() is None
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0 and 'up to date' in out, err


def test_rebuilds_a_clean_tree_when_the_overlay_changes(project):
    core = project / 'overlay' / 'common' / 'lora.py'
    original = core.read_text()
    core.write_text(original + '\n# changed\n')
    result = vendor(project, 'edm')
    assert result.returncode == 0 and 'rebuilding' in result.stdout
    assert (project / 'vendor' / 'edm' / 'training' / 'lora.py').read_text().endswith('# changed\n')
    core.write_text(original)
    assert vendor(project, 'edm').returncode == 0


def test_refuses_a_patch_that_does_not_apply_then_rebuild_recovers(project):
    context = '\n         self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)\n' # a context line of the networks.py patch
    patch = project / 'patches' / 'edm' / next(os.path.basename(p) for p in read_series('edm') if context in open(p).read())
    original = patch.read_text()
    patch.write_text(original.replace(context, context.replace('norm1', 'norm_one'), 1))
    head = git(project / 'vendor' / 'edm', 'rev-parse', 'HEAD')
    assert_refused(vendor(project, 'edm', '--rebuild'), 'does not apply')
    assert git(project / 'vendor' / 'edm', 'rev-parse', 'HEAD') == head, 'a failed rebuild leaves the old tree'
    patch.write_text(original)
    result = vendor(project, 'edm', '--rebuild')
    assert result.returncode == 0, result.stderr
    assert vendor(project, 'edm').stdout.strip().endswith('+ overlay)')


def test_unknown_upstream_is_one_line(project):
    assert_refused(vendor(project, 'stable-diffusion'), 'unknown upstream "stable-diffusion" (known: dataflowr, edm, edm2, iddpm)')


def test_notebook_upstream_is_its_extracted_module_plus_patches(project):
    result = vendor(project, 'dataflowr', '--pristine')
    assert result.returncode == 0, result.stderr
    tree, pristine = project / 'vendor' / 'dataflowr', project / 'vendor' / 'pristine' / 'dataflowr'
    assert git(tree, 'log', '--format=%s') .splitlines()[-1].startswith('Extract nano_diffusion.py from Module18/ddpm_nano_sol.ipynb')
    assert sorted(os.listdir(pristine)) == ['.git', 'nano_diffusion.py']
    assert (tree / 'lora.py').exists() and (tree / 'nano_diffusion.py').read_text() != (pristine / 'nano_diffusion.py').read_text()
    again = vendor(project, 'dataflowr', '--pristine')
    assert again.returncode == 0 and 'up to date' in again.stdout
    exported = tool('vendoring.export', 'dataflowr', cwd=project) # 0002 ends with a context line holding one space
    assert exported.returncode == 0, exported.stderr
    for patch in read_series('dataflowr'):
        assert (project / 'patches' / 'dataflowr' / os.path.basename(patch)).read_text() == open(patch).read(), 'export writes the patches back unchanged'


def test_a_changed_extraction_makes_the_notebooks_pristine_tree_again(project):
    assert vendor(project, 'dataflowr', '--pristine').returncode == 0
    pristine = project / 'vendor' / 'pristine' / 'dataflowr' / 'nano_diffusion.py'
    pristine.write_text(pristine.read_text() + '# as an older extraction wrote it\n')
    extraction = project / 'tools' / 'vendoring' / 'notebook.py'
    original = extraction.read_text()
    extraction.write_text(original + '\n# changed\n')
    result = vendor(project, 'dataflowr', '--pristine')
    assert result.returncode == 0 and 'rebuilding' in result.stdout, result.stdout + result.stderr
    assert 'older extraction' not in pristine.read_text(), 'the pristine tree comes from the extraction too'
    extraction.write_text(original)
    assert vendor(project, 'dataflowr', '--pristine').returncode == 0


def test_install_puts_the_tree_on_the_environments_path(monkeypatch, tmp_path):
    from tools.vendoring import build
    monkeypatch.setattr(build.sysconfig, 'get_paths', lambda: dict(purelib=str(tmp_path)))
    monkeypatch.setattr(build.sys, 'prefix', '/a/virtual/environment')
    upstream = read_upstream('iddpm')
    build.install(upstream)
    assert (tmp_path / 'vendor-improved-diffusion.pth').read_text() == os.path.join(ROOT, 'vendor', 'improved-diffusion') + '\n'


def test_export_writes_back_every_series_unchanged(project):
    """make patches on freshly built trees reproduces each committed patch file byte for byte, so all
    of them carry the one header that tools/vendoring/export.py writes."""
    for name in upstream_names():
        assert vendor(project, name).returncode == 0
        result = tool('vendoring.export', name, cwd=project)
        assert result.returncode == 0, result.stderr
        for path in sorted((project / 'patches' / name).glob('*.patch')):
            text = path.read_text()
            assert text == open(os.path.join(ROOT, 'patches', name, path.name)).read(), f'{name}/{path.name} changed on export'
            assert text.startswith('From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n'
                                   'From: LoRA conditioning project <noreply@example.org>\n'
                                   'Date: Sat, 1 Jan 2000 00:00:00 +0000\nSubject: ') and '[PATCH' not in text.split('\n\n')[0]


def test_export_header_ignores_who_made_the_commit_and_when():
    from tools.vendoring.export import uniform_header
    text = ('From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n'
            'From: =?UTF-8?q?Someone=20Else?=\n <someone@example.com>\nDate: Thu, 26 Nov 2026 22:06:21 +0000\n'
            'Subject: Do it\n\nBody.\nDate: in the body stays\n---\n')
    assert uniform_header(text) == (
        'From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n'
        'From: LoRA conditioning project <noreply@example.org>\nDate: Sat, 1 Jan 2000 00:00:00 +0000\n'
        'Subject: Do it\n\nBody.\nDate: in the body stays\n---\n')


@pytest.mark.parametrize('upstream', upstream_names())
def test_every_patch_header_ends_in_what_it_implements_of_the_paper(upstream):
    """The last paragraph of each header is one line: `Paper: <sections>.` or `Not part of the paper's method.`"""
    for patch in read_series(upstream):
        closing = patch_header(patch)[2].split('\n\n')[-1]
        assert '\n' not in closing and (closing == "Not part of the paper's method." or
                                        (closing.startswith('Paper: ') and closing.endswith('.'))), f'{patch}: {closing!r}'
