"""The Fig. 5 grid tool (tools/figures/class_grid.py) on two tiny class-conditional EDM networks."""

import pickle

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import EDM, run_in
from tiny import EDM_DDPMPP


@pytest.fixture(scope='module')
def class_grid():
    """The tool, imported into this process with EDM's tree on the path (as it puts it there itself)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(EDM)
        from tools.figures import class_grid
        yield class_grid


@pytest.fixture(scope='module')
def snapshots(tmp_path_factory):
    """network-snapshot pickles of a scale-and-shift and a ClassLoRA network (random, as if trained)."""
    top = tmp_path_factory.mktemp('class-grid')
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(EDM)
        from training import networks
        paths = {}
        for name, kwargs in {'shift': {}, 'classlora': dict(lora='class', lora_rank=2), 'uncond': dict(label_dim=0), 'shift-8px': dict(img_resolution=8)}.items():
            torch.manual_seed(0)
            net = networks.EDMPrecond(**dict(EDM_DDPMPP, **kwargs)).eval()
            with torch.no_grad(): # the zero-initialised layers as training leaves them, so that classes matter
                for param_name, param in net.named_parameters():
                    if param_name.endswith(('lora_B', 'proj.weight', 'aux_conv.weight', 'map_label.weight')):
                        param.normal_(0, 0.3)
            paths[name] = top / f'{name}.pkl'
            with open(paths[name], 'wb') as f:
                pickle.dump(dict(ema=net), f)
    return paths


def test_a_one_hot_column_is_what_generate_py_draws_for_that_class_and_seed(class_grid, snapshots, tmp_path):
    run_in(EDM, ['generate.py', f'--network={snapshots["classlora"]}', f'--outdir={tmp_path}', '--seeds=5', '--class=7', '--steps=4'])
    expected = np.asarray(PIL.Image.open(tmp_path / '000005.png'))
    net = class_grid.load_network(str(snapshots['classlora']))
    images = class_grid.sample(net, 5, [np.eye(10)[7], np.eye(10)[2], 0.5 * np.eye(10)[7]], steps=4)
    assert np.array_equal(images[0], expected), 'same latent, class and sampler as generate.py --seeds=5 --class=7'
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2]), 'the class vector changes the image'


def test_the_grid_has_a_row_per_network_and_seed_and_a_column_per_value(class_grid, snapshots, tmp_path):
    out = tmp_path / 'fig5.png'
    class_grid.main(['--nets', str(snapshots['shift']), str(snapshots['classlora']), '--names', 'scale-and-shift', 'ClassLoRA',
                     '--lambdas=0,0.5,1', '--scales=-1,0,1,2', '--seeds', '0,1', '--steps', '3', '--classes', 'airplane', 'horse', '--out', str(out)])
    picture = np.asarray(PIL.Image.open(out).convert('L'))
    # Each panel: 4 rows (2 networks x 2 seeds) of 16-pixel samples enlarged 6 times, with a 1-pixel gap.
    cell = 16 * 6 + 6
    assert picture.shape[0] > 2 * 4 * cell and picture.shape[1] > 4 * cell
    assert picture.std() > 20, 'samples and labels, not a blank page'


@pytest.mark.parametrize('args,message', [
    (['--nets', 'uncond'], 'is not class-conditional'),
    (['--nets', 'missing.pkl'], 'no such file'),
    (['--nets', 'shift', '--classes', 'airplane', 'unicorn'], 'unknown class "unicorn"'),
    (['--nets', 'shift', 'classlora', '--names', 'one'], '--names needs one name a network'),
    (['--nets', 'shift', 'shift-8px'], '3x8x8 images, 10 classes, unlike the networks before it'),
])
def test_bad_input_is_one_line(args, message, class_grid, snapshots, tmp_path, capsys):
    args = [str(snapshots.get(arg, arg)) for arg in args]
    with pytest.raises(SystemExit) as refused:
        class_grid.main([*args, '--steps', '2', '--out', str(tmp_path / 'x.png')])
    printed = capsys.readouterr().err # argparse prints its usage and message; sys.exit(message) prints the message
    assert refused.value.code != 0 and message in printed + str(refused.value.code)
