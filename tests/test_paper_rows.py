"""The table of paper rows (tools/paper/rows.py): parameter parity (`make params`), the commands of each target, the audit budget."""

import dataclasses
import os
import re
import shutil

import pytest

from conftest import ROOT, tool
from tools.paper import params
from tools.paper.rows import ROWS, rows
from tools.vendoring.upstream import read_upstream

# What the paper's text (and the upstream code) gives for the counted rows where the paper's count
# differs, written independently of the table. The two FFHQ rows are explained by settings inferred
# from the counts, which the rows then use; the ImageNet64 row is not explained.
TEXT_GIVES = {
    ('edm', 'FFHQ64 uncond, with LoRA'): 63941619,
    ('edm', 'FFHQ64 uncond, only LoRA'): 58819827,
    ('iddpm', 'ImageNet64 uncond, with LoRA'): 124175248,
}
INFERRED = {('edm', 'FFHQ64 uncond, with LoRA'): '--lora-scale=trainable', ('edm', 'FFHQ64 uncond, only LoRA'): '--lora-mlp=128,128'}
COUNTED = list(params.counted_rows())


@pytest.mark.parametrize('table,row', COUNTED, ids=[f'{row.upstream} {table}: {row.title(table)}' for table, row in COUNTED])
def test_parameter_count(table, row):
    key = (row.upstream, row.title(table))
    expected = row.paper_params if key in INFERRED or key not in TEXT_GIVES else TEXT_GIVES[key]
    assert params.COUNTERS[row.upstream](row) == expected
    assert row.rules_params == TEXT_GIVES.get(key), 'the table records what the text gives where the count differs'
    assert (row.note is None) == (key not in TEXT_GIVES), 'a note exactly where the count does not follow from the text'
    if key in INFERRED: # without the inferred flag, the row's network is the text's
        assert INFERRED[key] in row.variant_flags and row.note.startswith('inferred from the count')
        text_only = dataclasses.replace(row, variant_flags=tuple(f for f in row.variant_flags if f != INFERRED[key]))
        assert params.COUNTERS[row.upstream](text_only) == TEXT_GIVES[key]


# Table 3 and Fig. 5 give no counts. Ours, from the facts of the network (6 attention blocks of 256
# channels, an embedding of 512; UC-LoRA adds 2,011,608) rather than from the code that counts them.
ADALN = 6 * 2 * 256 * (512 + 1)                                 # scale and shift a channel, from emb, a block
CLASS_LORA = 6 * 10 * 4 * ((256 + 3 * 256) + (256 + 256))        # a rank-4 basis a class on qkv and proj (A and B), a block
OURS_ONLY = {
    ('Table 3', 'CIFAR-10 uncond, adaLN on attention'): 53411675 - 2011608 + ADALN,
    ('Table 3', 'CIFAR-10 cond, adaLN on attention'): 53413083 - 2011608 + ADALN,
    ('Table 3', 'CIFAR-10 uncond, only LoRA'): 53411675,
    ('Table 3', 'CIFAR-10 cond, only LoRA'): 53413083,
    ('Fig. 5', 'CIFAR-10 cond, ClassLoRA, unconditional base'): 55733891 + CLASS_LORA, # the unconditional baseline: no map_label
}


def test_counts_of_the_comparisons_the_paper_gives_none_for():
    counts = {(table, row.title(table)): params.COUNTERS[row.upstream](row) for table, row in params.uncounted_rows() if table != 'EDM2'}
    assert counts == OURS_ONLY


def test_edm2_counts():
    """make params counts EDM2's rows as train_edm2.py builds them: edm2-img64-s with UC-LoRA at the paper's sizes is
    280,209,381 + 7,625,502 (test_edm2_lora derives both from the network's definition); the CIFAR-10 recipe keeps
    img64-s's attention Blocks (its 64x64 level has none), so LoRA adds as much; a conditional run adds the class
    embedding of 10 classes into the 768-wide embedding."""
    counted = {(row.dataset, row.variant): params.edm2_count(row) for row in rows(upstream='edm2')}
    assert (counted['img64', 'baseline'], counted['img64', 'with-lora'] - counted['img64', 'baseline']) == (280_209_381, 7_625_502)
    assert counted['cifar10-uncond', 'with-lora'] - counted['cifar10-uncond', 'baseline'] == 7_625_502
    assert counted['cifar10-cond', 'baseline'] - counted['cifar10-uncond', 'baseline'] == 10 * 768, 'the class embedding'


def test_the_table_holds_every_row_of_the_papers_tables_once():
    assert len(COUNTED) == 23, '9 EDM and 9 IDDPM rows of Table 1, 5 of Table 2'
    assert len({row.name for row in ROWS}) == len(ROWS), 'one row a name: upstream, dataset, variant'
    assert len(rows(table='Table 3')) == 4 and len(rows(table='Fig. 3')) == 5
    for row in rows(upstream='edm', runnable=True) + rows(upstream='iddpm'):
        assert row.recipe.fid_images == 50000 and row.recipe.fid_ref.endswith('.npz') and row.nfe
    for row in rows(upstream='iddpm'):
        assert str(row.nfe) in [str(flag) for flag in row.variant_flags], 'sampled at the full number of steps'


def test_datasets_of_the_rows_are_make_targets():
    makefile = open(f'{ROOT}/Makefile').read()
    for row in rows(upstream='edm') + rows(upstream='iddpm'):
        assert re.search(rf'^{re.escape(row.recipe.data)}:', makefile, re.M), row.recipe.data
        assert re.search(rf'^{row.recipe.make_data.split()[0]}:', makefile, re.M), row.recipe.make_data


def dry_run(tmp_path, row, variant, *extra, driver='edm'):
    """The three commands (train, generate or sample, fid calc) a paper-row driver would run for a snapshot
    (ImageNet64 first makes its reference statistics: a fourth)."""
    result = tool(f'drivers.{driver}', row, f'--variant={variant}', '--dry-run', f'--runs={tmp_path}', *extra)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith('[vendor/') and ' ref ' not in line]
    assert len(commands) == 3, 'train, generate or sample, fid'
    return commands


@pytest.mark.parametrize('row,variant,expected,absent', [
    ('cifar10-uncond', 'baseline', ['--cond=0', '--arch=ddpmpp', '--batch=512', '--steps=18'], ['--lora', '--conv-cond']),
    ('cifar10-uncond', 'with-lora', ['--lora=uc', '--lora-bases=18', '--lora-rank=4'], ['--conv-cond', '--transfer']),
    ('cifar10-cond', 'only-lora', ['--cond=1', '--lora=uc', '--lora-bases=18', '--conv-cond=False'], ['--transfer']),
    ('cifar10-uncond', 'pretrained', ['--lora=uc', '--duration=100', '--transfer=' + ROOT + '/downloads/edm-pretrained/edm-cifar10-32x32-uncond-vp.pkl'], []),
    ('cifar10-uncond', 'adaln', ['--adaln=True', '--conv-cond=False'], ['--lora']),
    ('cifar10-cond', 'adaln', ['--cond=1', '--adaln=True', '--conv-cond=False'], ['--lora']),
    ('cifar10-cond', 'classlora', ['--cond=1', '--lora=class', '--lora-rank=4'], ['--lora-bases', '--conv-cond', '--adaln']),
    ('ffhq64', 'finetune', ['--lora=uc', '--lora-bases=20', '--lora-scale=trainable', '--finetune=True',
                            '--transfer=' + ROOT + '/downloads/edm-pretrained/edm-ffhq-64x64-uncond-vp.pkl'], []),
    ('ffhq64', 'with-lora', ['--cres=1,2,2,2', '--batch=256', '--lr=2e-4', '--dropout=0.05', '--augment=0.15', '--lora-bases=20', '--steps=40', 'ffhq-64x64.npz'], []),
])
def test_targets_use_the_papers_flags(row, variant, expected, absent, tmp_path):
    commands = ' '.join(dry_run(tmp_path, row, variant))
    for flag in expected:
        assert flag in commands
    for flag in absent:
        assert flag not in commands
    assert '--precond' not in commands, "EDM's own recipe (--precond=edm, the default)"


def test_gpus_launch_torchrun(tmp_path):
    train, generate, fid = dry_run(tmp_path, 'cifar10-cond', 'with-lora', '--gpus=4')
    for command in [train, generate]:
        assert '-m torch.distributed.run --standalone --nproc_per_node=4' in command
    # torchrun would take fid.py's --num for an abbreviation of its own --numa-binding: one process.
    assert 'torch.distributed.run' not in fid and ' fid.py calc ' in fid and '--num=50000' in fid


@pytest.mark.parametrize('upstream,lora_module', [('edm', 'overlay/common/lora.py'), ('iddpm', 'overlay/common/lora.py'),
                                                  ('dataflowr', 'overlay/common/lora.py'), ('edm2', 'overlay/edm2/training/lora_edm2.py')])
def test_audit_keeps_the_lora_patches_within_their_budget(upstream, lora_module):
    result = tool('vendoring.audit', upstream)
    assert result.returncode == 0, result.stdout + result.stderr
    changed = int(re.search(r'LoRA patches change (\d+) upstream lines', result.stdout).group(1))
    assert 0 < changed <= int(read_upstream(upstream)['lora_line_budget'])
    assert lora_module in result.stdout


def test_audit_fails_over_budget(tmp_path):
    project = tmp_path / 'project'
    for name in ['tools', 'patches', 'overlay']:
        shutil.copytree(f'{ROOT}/{name}', project / name, ignore=shutil.ignore_patterns('__pycache__'))
    upstream = project / 'patches' / 'edm' / 'UPSTREAM'
    upstream.write_text(re.sub(r'lora_line_budget: \d+', 'lora_line_budget: 1', upstream.read_text()))
    result = tool('vendoring.audit', 'edm', cwd=project)
    assert result.returncode == 1 and 'budget 1: OVER' in result.stdout


def test_audit_says_so_when_an_upstream_has_no_lora_patch_yet(tmp_path):
    project = tmp_path / 'project'
    for name in ['tools', 'patches', 'overlay']:
        shutil.copytree(f'{ROOT}/{name}', project / name, ignore=shutil.ignore_patterns('__pycache__'))
    series = project / 'patches' / 'edm' / 'series'
    series.write_text(''.join(line for line in series.read_text().splitlines(keepends=True) if 'lora' not in line))
    result = tool('vendoring.audit', 'edm', cwd=project)
    assert result.returncode == 0 and 'no LoRA patch yet (budget 80: within)' in result.stdout
    assert 'LoRA patches change' not in result.stdout and '(LoRA)' not in result.stdout


@pytest.mark.parametrize('row,variant,expected,absent', [
    ('cifar10-uncond', 'baseline', ['--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3',
                                    '--noise_schedule cosine', '--diffusion_steps 4000', '--lr 0.0001 --batch_size 128'], ['--time_lora', '--lora_', '--conv_cond']),
    ('cifar10-uncond', 'with-lora', ['--diffusion_steps 4001 --time_lora True --lora_bases 11 --lora_rank 4'], ['--class_lora', '--conv_cond']),
    ('cifar10-cond', 'with-lora', ['--class_cond True --num_classes 10', '--time_lora True', '--class_lora True'], ['--conv_cond']),
    ('cifar10-cond', 'only-lora', ['--class_lora True --conv_cond False'], []),
    ('imagenet64', 'with-lora', ['--image_size 64', '--dropout 0.0', 'ema_0.9999_1500000.pt', f'--ref={ROOT}/datasets/imagenet64-train-fid-ref.npz'], ['--class_cond']),
])
def test_iddpm_targets_use_the_papers_flags(row, variant, expected, absent, tmp_path):
    train, sample, fid = dry_run(tmp_path, row, variant, driver='iddpm')
    for flag in expected:
        assert flag in ' '.join([train, sample, fid])
    for flag in absent:
        assert flag not in train
    assert '--num_samples 50000' in sample and '--timestep_respacing' not in sample, 'full steps, 50k samples'
    assert '--sample_dir' in sample, 'batches written as they finish: resumable'
    assert 'fid.py calc' in fid and '[vendor/edm]' in fid, "EDM's Inception tool"


def test_imagenet64_is_scored_against_statistics_of_the_users_training_images(tmp_path):
    result = tool('drivers.iddpm', 'imagenet64', '--variant=baseline', '--dry-run', f'--runs={tmp_path}')
    ref = next(line for line in result.stdout.splitlines() if ' ref ' in line)
    assert f'fid.py ref --data={ROOT}/datasets/imagenet64-train --dest={ROOT}/datasets/imagenet64-train-fid-ref.npz.partial.npz' in ref
    assert '[vendor/edm]' in ref, "EDM's fid.py, with Inception"


@pytest.mark.parametrize('row,variant,expected,absent', [
    ('cifar10-uncond', 'baseline', ['--preset=edm2-img64-s', '--cres=2,3,4', '--duration=200Mi', '--dropout=0.13', '--cond=0', '--steps=18',
                                    '--num=50000', 'edm/fid-refs/cifar10-32x32.npz'], ['--lora', '--conv-cond']),
    ('cifar10-cond', 'with-lora', ['--cond=1', '--lora=uc', '--lora-bases=18', '--lora-rank=4'], ['--conv-cond']),
    ('img64', 'only-lora', ['--preset=edm2-img64-s', '--cond=1', '--lora=uc', '--conv-cond=False', '--steps=32', f'--ref={ROOT}/datasets/img64-fid-ref.npz'],
     ['--cres', '--dropout']),
])
def test_edm2_targets_train_with_the_rows_flags_and_score_edm2s_post_hoc_ema(row, variant, expected, absent, tmp_path):
    result = tool('drivers.edm2', row, f'--variant={variant}', '--dry-run', f'--runs={tmp_path}', '--gpus=2')
    assert result.returncode == 0, result.stderr
    train, reconstruct, generate, fid = [line for line in result.stdout.splitlines() if line.startswith('[vendor/') and ' ref ' not in line]
    kimg = {'cifar10-uncond': 200, 'cifar10-cond': 200, 'img64': 1024}[row] * 2 ** 20 // 1000 # EDM2 names files by nimg // 1000
    assert ' train_edm2.py ' in train and '-m torch.distributed.run --standalone --nproc_per_node=2' in train
    # The network scored at a snapshot is the post-hoc EMA of EDM2's choice for edm2-img64-s (0.075), rebuilt from the snapshots.
    assert f' reconstruct_phema.py --indir={tmp_path}/edm2-{row}-{variant} --inprefix=network-snapshot ' in reconstruct
    assert f'--outstd=0.075 --outkimg={kimg} --skip' in reconstruct and 'torch.distributed' not in reconstruct
    assert f' generate_images.py --net={tmp_path}/edm2-{row}-{variant}/phema-{kimg:07d}-0.075.pkl ' in generate
    assert '[vendor/edm]' in fid and ' fid.py calc ' in fid, "EDM's fid.py, as every row of the project"
    commands = ' '.join([train, reconstruct, generate, fid])
    for flag in expected:
        assert flag in commands
    for flag in absent:
        assert flag not in commands


def test_an_edm2_duration_train_edm2_cannot_read_is_one_clear_message(tmp_path):
    result = tool('drivers.edm2', 'cifar10-uncond', '--dry-run', f'--runs={tmp_path}', '--train-flags=--duration=200M')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert '--duration=200M: a count of training images' in result.stderr, result.stderr


def test_iddpm_gpus_launch_mpiexec_with_the_global_batch_split(tmp_path):
    train, sample, fid = dry_run(tmp_path, 'cifar10-uncond', 'with-lora', '--gpus=8', driver='iddpm')
    assert 'mpiexec -n 8' in train and 'mpiexec -n 8' in sample and 'bin/mpiexec' not in fid
    assert '--batch_size 16 ' in train + ' ', '128 images per step over 8 processes'


def test_smoke_runs_transfer_from_the_recipes_smoke_baseline(tmp_path):
    result = tool('drivers.edm', 'cifar10-uncond', '--variant=finetune', '--smoke', '--dry-run', f'--runs={tmp_path}')
    assert result.returncode == 0, result.stderr
    assert f'tools.drivers.edm cifar10-uncond --variant=baseline --smoke --runs={tmp_path}' in result.stdout, 'the baseline is made first'
    train = next(line for line in result.stdout.splitlines() if ' train.py ' in line)
    assert f'--transfer={tmp_path}/edm-cifar10-uncond-baseline-smoke/network-snapshot-000001.pkl' in train
    assert '--finetune=True' in train and 'nvlabs-fi-cdn' not in train, "not EDM's full-size published network"


def test_the_readme_tables_are_written_from_the_table_of_rows(monkeypatch):
    from tools.paper import readme
    with open(readme.README) as f:
        text = f.read()
    assert readme.rewritten(text) == text, 'README.md is out of date: run `make readme`'
    # A changed row changes the README: the check can fail.
    changed = dataclasses.replace(ROWS[0], paper_fid=99.5)
    monkeypatch.setattr(readme, 'rows', lambda **kwargs: [changed if row is ROWS[0] else row for row in rows(**kwargs)])
    assert '| 99.5 |' in readme.rewritten(text) and readme.rewritten(text) != text


def test_run_folders_are_named_and_read_by_one_function(tmp_path):
    from tools.paper.rows import row_of_folder, run_folder
    for row in rows(runnable=True):
        for smoke in (False, True):
            for authors in (False, True):
                folder = run_folder(str(tmp_path), row, smoke, authors)
                assert row_of_folder(folder + '/') == (row, smoke, authors)
    with pytest.raises(KeyError):
        row_of_folder(str(tmp_path / 'edm-cifar10-uncond-nonsense'))


def test_a_dry_run_with_relative_runs_names_absolute_folders_and_makes_none(tmp_path):
    runs = os.path.relpath(tmp_path / 'runs', ROOT)
    result = tool('drivers.edm', 'cifar10-uncond', '--variant=baseline', '--dry-run', f'--runs={runs}')
    assert result.returncode == 0, result.stderr
    assert f'--outdir={tmp_path}/runs/edm-cifar10-uncond-baseline' in result.stdout, 'the steps run in vendor/edm: absolute paths'
    assert not (tmp_path / 'runs').exists(), 'a dry run writes nothing'
