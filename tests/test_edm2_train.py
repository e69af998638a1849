"""End to end on CPU: EDM2's own train_edm2.py at tiny size, on one process and two (gloo), resumed; the flags of
patches/edm2/0002 (learning-rate ramp-up, network size) against pristine EDM2's configuration."""

import json
import math
import os
import pickle
import shutil
import sys

import pytest
import torch

from conftest import EDM2, HELPERS, PRISTINE_EDM2, edm2_imported, edm2_training_config, run_in
from tiny import EDM2_TRAIN

pytestmark = pytest.mark.first(46) # one of the longer modules, started early (seconds measured by --durations)


@pytest.fixture(scope='module')
def run(edm2_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('edm2-run') / 'run'
    run_in(EDM2, ['train_edm2.py', f'--outdir={run_dir}', f'--data={edm2_dataset}', *EDM2_TRAIN])
    return run_dir


def stats(run_dir):
    with open(run_dir / 'stats.jsonl') as f:
        return [json.loads(line) for line in f]


def test_trains_on_the_cpu_and_writes_snapshots_and_a_checkpoint(run):
    assert sorted(name for name in os.listdir(run) if name.endswith(('.pkl', '.pt'))) == [
        'network-snapshot-0000000-0.050.pkl', 'network-snapshot-0000000-0.100.pkl', # EDM2 saves its first snapshot at 0 images
        'network-snapshot-0000001-0.050.pkl', 'network-snapshot-0000001-0.100.pkl', # one a power-function EMA length
        'training-state-0000001.pt']
    rows = stats(run)
    assert rows[-1]['Progress/kimg'] == 1.024
    losses = [row['Loss/loss'] for row in rows if 'Loss/loss' in row]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses), 'a status row after each of the 8 steps'
    with edm2_imported(EDM2):
        snapshots = {}
        for kimg in [0, 1]:
            with open(run / f'network-snapshot-000000{kimg}-0.100.pkl', 'rb') as f:
                snapshots[kimg] = pickle.load(f)['ema'].state_dict() # as EDM2's generate_images.py loads them
    assert all(value.dtype == torch.float16 for value in snapshots[1].values() if value.is_floating_point())
    assert any(not torch.equal(snapshots[0][name], value) for name, value in snapshots[1].items()), 'training moved the EMA'


def test_a_snapshot_loads_and_samples_in_pristine_edm2(run, tmp_path):
    # As EDM2's generate_images.py loads it (the whole pickle, its loss function too) and with its sampler, in a process
    # with only the pristine tree on its path: the sources that the snapshot embeds run beside pristine EDM2's modules.
    run_in(PRISTINE_EDM2, [os.path.join(HELPERS, 'edm2_sample.py'), run / 'network-snapshot-0000001-0.100.pkl', tmp_path / 'sample.pt'])
    images = torch.load(tmp_path / 'sample.pt')['images']
    assert images.shape == (4, 3, 8, 8) and torch.isfinite(images).all()


def test_the_learning_rate_ramps_up_over_lr_rampup(run):
    # Each row reports the learning rate of the step before it: steps of 128 images at 0, 128, ... with a ramp-up of
    # 500 images (--lr-rampup=0.0005 Mimg) and no decay: 0.01 x min(images / 500, 1). EDM2's 10 Mimg would give 0.01 x images / 1e7.
    rates = [row['Loss/learning_rate'] for row in stats(run) if 'Loss/learning_rate' in row]
    assert rates == pytest.approx([0.01 * min(step * 128 / 500, 1) for step in range(8)], rel=1e-5) # stats.jsonl keeps 6 digits


@pytest.fixture(scope='module')
def resumed(run, edm2_dataset, tmp_path_factory):
    """The run resumed on two gloo processes for two more steps (EDM2 resumes when its command runs again on the
    same folder: here on a copy), with the state of each rank at its first step and at the end, as
    tests/helpers/edm2_train_capture.py saves them, and the output of torchrun."""
    top = tmp_path_factory.mktemp('edm2-resumed')
    shutil.copytree(run, top / 'run')
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    result = run_in(EDM2, [os.path.join(HELPERS, 'edm2_train_capture.py'), top, '--', f'--outdir={top / "run"}', f'--data={edm2_dataset}',
                           *EDM2_TRAIN, '--duration=1280'], launcher=torchrun)
    states = {f'{moment}-rank{rank}': torch.load(top / f'{moment}-rank{rank}.pt') for moment in ['first-step', 'end'] for rank in [0, 1]}
    return top / 'run', states, result.stdout


def assert_same_learned_state(state, expected):
    """Same network, EMAs and optimizer state (state dicts as EDM2's checkpoints hold them)."""
    for name, value in expected['net'].items():
        assert torch.equal(state['net'][name], value), name
    assert state['ema']['stds'] == expected['ema']['stds'] == [0.050, 0.100]
    for ema, expected_ema in zip(state['ema']['emas'], expected['ema']['emas'], strict=True):
        for name, value in expected_ema.items():
            assert torch.equal(ema[name], value), name
    assert state['optimizer']['param_groups'] == expected['optimizer']['param_groups']
    assert state['optimizer']['state'].keys() == expected['optimizer']['state'].keys()
    for index, optimizer_state in expected['optimizer']['state'].items():
        for key, value in optimizer_state.items():
            assert torch.equal(state['optimizer']['state'][index][key], value), (index, key)


def test_resume_restores_network_optimizer_ema_and_progress(run, resumed):
    resumed_run, states, _ = resumed
    with edm2_imported(EDM2):
        with pytest.raises(Exception, match='Weights only load failed'):
            torch.load(run / 'training-state-0000001.pt') # why patches/edm2/0001 loads it with weights_only=False
        saved = torch.load(run / 'training-state-0000001.pt', weights_only=False)
    assert saved['state']['cur_nimg'] == 1024
    for rank in [0, 1]:
        assert states[f'first-step-rank{rank}']['progress'] == dict(saved['state']) # images seen and training time
        assert_same_learned_state(states[f'first-step-rank{rank}'], saved)
    # And the real continuation: two more steps, from 1024 images to 1280.
    assert [row['Progress/kimg'] for row in stats(resumed_run)] == [row['Progress/kimg'] for row in stats(run)] + [1.152, 1.28]


def test_two_ranks_end_with_identical_parameters(resumed):
    _, states, output = resumed
    assert 'Number of GPUs:          2' in output
    assert states['end-rank0']['progress']['cur_nimg'] == states['end-rank1']['progress']['cur_nimg'] == 1280
    assert_same_learned_state(states['end-rank1'], states['end-rank0'])
    # Each rank saw its own half of every batch with its own noise, yet the updates were the same: the gradients were
    # averaged. And there were updates: the gains (EDM2's scalar parameters, which only the optimizer changes; its
    # forward pass renormalises the weights in place) moved.
    start, end = states['first-step-rank0']['net'], states['end-rank0']['net']
    gains = [name for name in start if name.endswith('gain')]
    assert len(gains) == 11 and all(not torch.equal(end[name], start[name]) for name in gains), 'out_gain and the emb_gain of the 10 blocks'


def test_the_flags_left_out_keep_edm2s_configuration_and_learning_rate(edm2_dataset):
    flags = [f'--data={edm2_dataset}', '--preset=edm2-img64-s']
    with edm2_imported(PRISTINE_EDM2) as train_edm2:
        pristine = edm2_training_config(train_edm2, *flags)
    with edm2_imported(EDM2) as train_edm2:
        patched = edm2_training_config(train_edm2, *flags)
        call = train_edm2.dnnlib.util.call_func_by_name
        batch = patched.batch_size
        for cur_nimg in [0, batch, 1 << 20, 5_000_000, 10_000_000, 100 << 20, patched.total_nimg]: # across the ramp-up and the decay
            assert call(cur_nimg=cur_nimg, batch_size=batch, **patched.lr_kwargs) == call(cur_nimg=cur_nimg, batch_size=batch, **pristine.lr_kwargs)
    assert patched.lr_kwargs.pop('rampup_Mimg') == 10, "EDM2's learning_rate_schedule default"
    assert patched == pristine, 'the network and everything else as EDM2 sets them up'


def test_lr_rampup_sets_the_ramp_up_in_mimg(edm2_dataset):
    with edm2_imported(EDM2) as train_edm2:
        config = edm2_training_config(train_edm2, f'--data={edm2_dataset}', '--preset=edm2-img64-s', '--lr-rampup=2.5')
        for cur_nimg in [0, 1_000_000, 2_500_000, 5_000_000]: # before the decay, which starts at 35,000 batches of 2048
            lr = train_edm2.dnnlib.util.call_func_by_name(cur_nimg=cur_nimg, batch_size=config.batch_size, **config.lr_kwargs)
            assert lr == pytest.approx(0.0100 * min(cur_nimg / 2.5e6, 1), rel=1e-12, abs=0)


def attention_blocks(train_edm2, *flags):
    """{block name: heads} of the blocks with attention in the network that these flags build, for 32x32 RGB images."""
    config = edm2_training_config(train_edm2, *flags)
    net = train_edm2.dnnlib.util.construct_class_by_name(**config.network_kwargs, img_resolution=32, img_channels=3, label_dim=10)
    blocks = {f'{side}.{name}': block for side in ['enc', 'dec'] for name, block in getattr(net.unet, side).items() if hasattr(block, 'num_heads')}
    for block in blocks.values():
        assert (block.attn_qkv is None) == (block.attn_proj is None) == (block.num_heads == 0)
    return {name: block.num_heads for name, block in blocks.items() if block.num_heads}


def test_channels_per_head_gives_a_small_network_attention(edm2_dataset):
    # 32 channels at every level (--cres=1,1,1): below EDM2's 64 channels a head, no block has attention.
    small = [f'--data={edm2_dataset}', '--channels=32', '--cres=1,1,1', '--blocks=1']
    at_16_and_8 = ['enc.16x16_block0', 'enc.8x8_block0', 'dec.8x8_in0', 'dec.8x8_block0', 'dec.8x8_block1', 'dec.16x16_block0', 'dec.16x16_block1']
    with edm2_imported(EDM2) as train_edm2:
        assert attention_blocks(train_edm2, *small) == {}
        assert attention_blocks(train_edm2, *small, '--channels-per-head=32') == {name: 1 for name in at_16_and_8}
        assert attention_blocks(train_edm2, *small, '--channels-per-head=16') == {name: 2 for name in at_16_and_8}
        # EDM2's own network (multipliers 1,2,3,4, 3 blocks) at 64 channels: the same blocks as before the patch.
        default = attention_blocks(train_edm2, f'--data={edm2_dataset}', '--channels=64')
    with edm2_imported(PRISTINE_EDM2) as train_edm2:
        assert attention_blocks(train_edm2, f'--data={edm2_dataset}', '--channels=64') == default != {}


def test_the_preset_sets_nothing_when_every_hyperparameter_is_given(edm2_dataset):
    # --preset has a default (edm2-img512-s), so a command line without it uses that one: for the values it leaves out.
    with edm2_imported(EDM2) as train_edm2:
        configs = [edm2_training_config(train_edm2, f'--data={edm2_dataset}', *EDM2_TRAIN, *preset)
                   for preset in [[], ['--preset=edm2-img512-xxl'], ['--preset=edm2-img64-s']]]
        leaving_one_out = edm2_training_config(train_edm2, f'--data={edm2_dataset}', *[flag for flag in EDM2_TRAIN if not flag.startswith('--P_std')])
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].loss_kwargs.P_std == 1.6 and leaving_one_out.loss_kwargs.P_std == 1.0 # edm2-img512-s's


BAD_FLAGS = [
    (['--lr-rampup=-1'], "Invalid value for '--lr-rampup'"),
    (['--channels-per-head=0'], "Invalid value for '--channels-per-head'"),
    (['--cres=1,x'], "Invalid value for '--cres'"),
    (['--blocks=0'], "Invalid value for '--blocks'"),
    (['--channels=0'], "Invalid value for '--channels'"),
    (['--channel-per-head=8'], "No such option '--channel-per-head'"),
]


@pytest.mark.parametrize('flags,message', BAD_FLAGS)
def test_bad_flags_are_usage_errors(flags, message, edm2_dataset, tmp_path):
    from click.testing import CliRunner
    with edm2_imported(EDM2) as train_edm2:
        result = CliRunner().invoke(train_edm2.cmdline, [f'--outdir={tmp_path}', f'--data={edm2_dataset}', *flags])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_mistyped_flag_on_the_command_line_is_one_usage_message(edm2_dataset, tmp_path):
    flags, message = BAD_FLAGS[-1] # rejected by click before train_edm2.py starts its process group
    result = run_in(EDM2, ['train_edm2.py', f'--outdir={tmp_path}', f'--data={edm2_dataset}', *flags], expect_ok=False)
    assert result.returncode == 2 and 'Traceback' not in result.stdout, result.stdout
    [error] = [line for line in result.stdout.splitlines() if line.startswith('Error:')]
    assert message in error and '--channels-per-head' in error, 'click names the flag meant'
