"""The mini rows (tools/paper/rows.py: MINI_ROWS): each keeps its paper row's flags and LoRA sizes and
overrides only size and budget, the same overrides for every variant of a group; run folders name
their seed; `make mini` runs every row of a group through its driver."""

import pytest

from tools.drivers import iddpm, mini
from tools.paper import rows
from tools.scoring import mini_report, records
from tools.paper.rows import MINI_ROWS, flag_value, mini_group, override, row_of_folder, run_folder, seed_of_folder

# What a mini row may change of its paper row (the issue's list: size and budget, and augmentation off, measured
# to help at the mini budget: results/mini/costs-2cpu.md), by upstream.
SIZE_AND_BUDGET = {
    'edm': {'--batch', '--cbase', '--cres', '--blocks', '--duration', '--lr-rampup', '--ema', '--tick', '--snap', '--dump', '--augment'},
    'iddpm': {'--num_channels', '--num_res_blocks', '--batch_size', '--ema_rate', '--save_interval'},
    'edm2': {'--batch', '--channels', '--cres', '--blocks', '--duration', '--lr-rampup', '--status', '--snapshot', '--checkpoint'},
}


def names(flags):
    """{name: value} of a flag list in either spelling."""
    flags = [str(flag) for flag in flags]
    found, index = {}, 0
    while index < len(flags):
        if '=' in flags[index]:
            name, value = flags[index].split('=', 1)
            index += 1
        else:
            name, value = flags[index], flags[index + 1]
            index += 2
        found[name] = value
    return found


@pytest.mark.parametrize('row', MINI_ROWS, ids=lambda row: row.name)
def test_a_mini_row_keeps_its_paper_rows_flags_but_size_and_budget(row):
    paper = row.scales
    assert (row.upstream, row.variant) == (paper.upstream, paper.variant)
    assert (row.lora_bases, row.lora_rank, tuple(row.variant_flags)) == (paper.lora_bases, paper.lora_rank, tuple(paper.variant_flags))
    ours = names(list(row.flags) + list(row.recipe.train_flags))
    theirs = names(list(paper.flags) + list(paper.recipe.train_flags))
    changed = {name for name in theirs if ours.get(name) != theirs[name]}
    assert changed <= SIZE_AND_BUDGET[row.upstream], f'{row.name} changes {changed - SIZE_AND_BUDGET[row.upstream]}'
    added = set(ours) - set(theirs)
    assert added <= SIZE_AND_BUDGET[row.upstream], f'{row.name} adds {added - SIZE_AND_BUDGET[row.upstream]}'
    assert row.recipe.detector == 'digits' and row.recipe.fid_images >= 640 # ten times the detector's 64 features


def test_every_variant_of_a_group_gets_the_same_overrides():
    for group in {mini_group(row) for row in MINI_ROWS}:
        members = [row for row in MINI_ROWS if mini_group(row) == group]
        assert len({(row.recipe.flags, row.recipe.train_flags, row.recipe.sample_flags, row.recipe.iterations) for row in members}) == 1, group


def test_the_groups_are_the_issues():
    groups = {group: sorted(row.variant for row in MINI_ROWS if mini_group(row) == group) for group in rows.MINI_GROUPS}
    assert groups == {'edm-uncond': ['adaln', 'baseline', 'only-lora', 'with-lora'], 'edm-cond': ['baseline', 'classlora', 'with-lora'],
                      'iddpm-uncond': ['baseline', 'only-lora', 'with-lora'], 'iddpm-cond': ['baseline', 'with-lora'],
                      'edm2-uncond': ['baseline', 'with-lora']}


def test_run_folders_name_the_seed_and_are_read_back(tmp_path):
    for row in MINI_ROWS:
        folder = run_folder(str(tmp_path), row, seed=2)
        assert folder.endswith(f'{row.name}-seed2')
        assert row_of_folder(folder) == (row, False, False) and seed_of_folder(folder) == 2
    paper = rows.find('edm', 'cifar10-uncond', 'with-lora')
    assert row_of_folder(run_folder('runs', paper, smoke=True)) == (paper, True, False)
    assert seed_of_folder(run_folder('runs', paper)) is None


def test_override_replaces_in_place_in_either_spelling_and_adds_the_rest():
    assert override(('--a=1', '--b', 2, '--c=3'), ('--b', 5, '--d=4', '--a=9')) == ('--a=9', '--b', 5, '--c=3', '--d=4')
    assert flag_value(override(('--batch=512',), ('--batch=64',)), '--batch') == '64'


def test_make_mini_runs_the_papers_groups_unless_told_and_edm2s_when_named(monkeypatch, tmp_path):
    """The 3-hour budget a seed is the paper's comparisons'; EDM2's group (not in the paper) is one name away."""
    commands = []
    monkeypatch.setattr(mini, 'run_tool', lambda command, what: commands.append(command) or 0)
    mini.main(['--dry-run', f'--runs={tmp_path}'])
    ran = [(command[2].split('.')[-1], command[3], command[4]) for command in commands]
    paper = [(row.upstream, row.dataset, f'--variant={row.variant}') for row in MINI_ROWS if row.upstream != 'edm2']
    assert ran == paper and len(paper) == 12
    commands.clear()
    mini.main(['--group', 'edm2-uncond', '--dry-run', f'--runs={tmp_path}'])
    assert [(command[2], command[4]) for command in commands] == [('tools.drivers.edm2', '--variant=baseline'), ('tools.drivers.edm2', '--variant=with-lora')]


def test_make_mini_runs_each_row_of_a_group_for_each_seed_through_its_driver(monkeypatch, capsys, tmp_path):
    commands = []
    monkeypatch.setattr(mini, 'run_tool', lambda command, what: commands.append(command) or 0)
    mini.main(['--group', 'iddpm-cond', '--seeds', '0', '1', '--dry-run', f'--runs={tmp_path}'])
    ran = [(command[2], command[3], command[4], command[5]) for command in commands]
    assert ran == [('tools.drivers.iddpm', 'mini-cond', f'--variant={variant}', f'--seed={seed}') for seed in (0, 1) for variant in ('baseline', 'with-lora')]
    # The driver of such a command (in this process): the mini recipe's flags, its seed, and its EMA rate naming the snapshots.
    iddpm.main(list(commands[-1][3:]))
    printed = capsys.readouterr().out
    ema_rate, respacing = rows.flag_value(rows.MINI_IDDPM_TRAIN, '--ema_rate'), rows.flag_value(rows.MINI_IDDPM_SAMPLE, '--timestep_respacing')
    assert f'iddpm-mini-cond-with-lora-seed1' in printed and '--seed 1' in printed and f'--ema_rate {ema_rate}' in printed
    assert f'ema_{ema_rate}_{rows.MINI_IDDPM_ITERATIONS:06d}.pt' in printed and f'--timestep_respacing {respacing}' in printed
    assert not (tmp_path / 'iddpm-mini-cond-with-lora-seed1').exists(), 'a dry run writes nothing'


def test_make_mini_variants_picks_rows_of_each_group_and_refuses_none(monkeypatch, capsys, tmp_path):
    commands = []
    monkeypatch.setattr(mini, 'run_tool', lambda command, what: commands.append(command) or 0)
    mini.main(['--group', 'edm-uncond', 'iddpm-cond', '--variants', 'baseline', 'with-lora', '--seeds', '1', '2', '--dry-run', f'--runs={tmp_path}'])
    ran = [(command[2], command[3], command[4], command[5]) for command in commands]
    assert ran == [(f'tools.drivers.{upstream}', dataset, f'--variant={variant}', f'--seed={seed}')
                   for upstream, dataset in [('edm', 'mini-uncond'), ('iddpm', 'mini-cond')] for seed in (1, 2) for variant in ('baseline', 'with-lora')]
    with pytest.raises(SystemExit) as stop:
        mini.main(['--group', 'iddpm-cond', '--variants', 'adaln', '--dry-run', f'--runs={tmp_path}'])
    assert stop.value.code == 2 and 'no mini row of iddpm-cond is a variant among adaln' in capsys.readouterr().err


def fake_run(runs, row, seed, fids):
    """A run folder with one scored record a snapshot (FIDs by snapshot, KID a tenth of each)."""
    scores = runs / f'{row.name}-seed{seed}' / 'scores'
    scores.mkdir(parents=True)
    for index, fid in enumerate(fids):
        record = dict(snapshot=f'network-snapshot-{index * 25:06d}.pkl', images_seen=index * 25000, nfe=35, images=1000,
                      evaluations=[dict(seeds='seeds 0-999', fid=fid, kid=fid / 10)], evaluations_planned=1)
        records.write_json(str(scores / f'snapshot-{index}.json'), records.summarise(record))


def test_the_mini_tables_give_mean_spread_and_whether_the_papers_direction_holds(tmp_path):
    group = [row for row in MINI_ROWS if mini_group(row) == 'edm-uncond']
    by_variant = {row.variant: row for row in group}
    for seed, (base, lora) in enumerate([(8.0, 6.0), (9.0, 6.5), (10.0, 7.0)]):
        fake_run(tmp_path, by_variant['baseline'], seed, [270.0, base])
        fake_run(tmp_path, by_variant['with-lora'], seed, [270.0, lora])
    summaries = [mini_report.summary(row, str(tmp_path)) for row in group]
    base = summaries[[row.variant for row in group].index('baseline')]
    assert base['seeds'] == [0, 1, 2] and base['fid'] == pytest.approx(9.0) and base['fid_std'] == pytest.approx(1.0) # the sample standard deviation
    assert base['first'] == pytest.approx(270.0) and base['kid'] == pytest.approx(0.9)
    lines = '\n'.join(mini_report.comparison_lines('edm-uncond', summaries))
    # The paper: with LoRA 1.96 vs baseline 1.97 (lower); mini: 6.5 vs 9.0, lower by 2.5 > 0.5 + 1.0.
    assert '| with-lora vs baseline | -0.01 | -2.50 | yes | yes (sd 0.50 + 1.00) |' in lines
    assert '| only-lora vs baseline | 0.02 | no runs |' in lines


def test_make_mini_skips_a_figure_whose_runs_are_not_made_yet(monkeypatch, capsys, tmp_path):
    commands = []
    monkeypatch.setattr(mini, 'run_tool', lambda command, what: commands.append(command) or 0)
    mini.figures(str(tmp_path), ['edm-uncond', 'edm-cond'], 1) # no run folder at all
    assert commands == []
    printed = capsys.readouterr().out
    assert 'tools.figures.class_grid skipped: it needs runs of seed 1 not made yet' in printed
    assert 'tools.figures.composition_maps skipped' in printed
