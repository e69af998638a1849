"""Datasets checked before training (tools/data/dataset_check.py): through the drivers' own code path, a bad
EDM zip or improved-diffusion folder is refused in one line naming the file and the problem (dry runs: the
check comes before any step); the project's own smoke datasets are written again instead, and written
under a temporary name, so that a killed write never leaves a truncated one."""

import dataclasses
import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest

from tools.data.dataset_check import DatasetError, check_edm_zip, check_image_folder
from tools.data.synthetic import write_folder
from tools.drivers import edm, edm2, iddpm, steps
from tools.scoring import upstreams


def edm_zip(path, count=10, size=32, mode='RGB', labels=True):
    """A zip in the layout EDM's dataset_tool.py writes: 00000/img<index>.png and dataset.json ({"labels": [[name, class]]})."""
    names = [f'00000/img{index:08d}.png' for index in range(count)]
    with zipfile.ZipFile(path, 'w') as z:
        for index, name in enumerate(names):
            pixels = np.random.default_rng(index).integers(0, 256, (size, size, len(mode)), dtype=np.uint8)
            buffer = io.BytesIO()
            PIL.Image.fromarray(pixels.squeeze(), mode).save(buffer, format='png')
            z.writestr(name, buffer.getvalue())
        if labels is not None:
            z.writestr('dataset.json', json.dumps({'labels': [[name, index % 10] for index, name in enumerate(names)] if labels else None}))
    return path


def zip_members(path):
    """{name: bytes} of a zip (its bytes also hold each member's time of writing)."""
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def truncated(path):
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
    return path


def use_dataset(monkeypatch, upstream, dataset, data):
    """The drivers' table lookup, with the row's dataset (for every variant) at `data` instead of under datasets/."""
    row = steps.find(upstream, dataset, 'baseline')
    elsewhere = dataclasses.replace(row, recipe=dataclasses.replace(row.recipe, data=str(data)))
    monkeypatch.setattr(steps, 'find', lambda *args: elsewhere)


def dry_run(driver, dataset, tmp_path):
    driver.main([dataset, '--variant=baseline', '--dry-run', f'--runs={tmp_path / "runs"}'])


def refusal(monkeypatch, driver, dataset, data, tmp_path):
    """What the driver's dry run of `dataset`'s baseline row exited with, its dataset at `data`."""
    use_dataset(monkeypatch, driver.__name__.split('.')[-1], dataset, data)
    with pytest.raises(SystemExit) as stopped:
        dry_run(driver, dataset, tmp_path)
    return stopped.value.code


EDM_BAD = {
    'not a zip': ('cifar10-uncond', lambda path: path.write_bytes(b'not a zip at all\n' * 64), 'not a readable zip, truncated or damaged'),
    'truncated': ('cifar10-uncond', lambda path: truncated(edm_zip(path)), 'not a readable zip, truncated or damaged'),
    'no images': ('cifar10-uncond', lambda path: edm_zip(path, count=0), 'no images in the zip'),
    'wrong resolution': ('cifar10-uncond', lambda path: edm_zip(path, size=16), 'its images are 16x16 (00000/img00000000.png), not the 32x32'),
    'wrong channels': ('cifar10-uncond', lambda path: edm_zip(path, mode='L'), 'its images have 1 channel(s) (00000/img00000000.png: L), not the 3'),
    'cond without dataset.json': ('cifar10-cond', lambda path: edm_zip(path, labels=None), 'no dataset.json, so no class labels'),
    'cond with labels null': ('cifar10-cond', lambda path: edm_zip(path, labels=False), 'its dataset.json has no labels'),
    'cond with 5 classes': ('cifar10-cond', lambda path: edm_zip(path, count=5), 'labels give 5 classes (0 to 4), not the 10 classes'),
}


def test_a_good_edm_zip_passes_and_edms_own_zip_is_read_as_edm_reads_it(monkeypatch, tmp_path, edm_dataset):
    use_dataset(monkeypatch, 'edm', 'cifar10-cond', edm_zip(tmp_path / 'good.zip'))
    dry_run(edm, 'cifar10-cond', tmp_path) # no exit: checked and passed
    check_edm_zip(edm_dataset, 16, 10) # written by dataset_tool.py itself: 16x16, 10 classes
    with pytest.raises(DatasetError, match='not the 32x32'):
        check_edm_zip(edm_dataset, 32, 10)


IDDPM_BAD = {
    'empty folder': ('cifar10-uncond', lambda path: path.mkdir(), 'no images in the folder'),
    'not a folder': ('cifar10-uncond', lambda path: path.write_bytes(b'x'), 'not a folder'),
    'wrong resolution': ('cifar10-uncond', lambda path: write_folder(path, count=4, resolution=16), 'its images are 16x16 (c0_00000.png), not the 32x32'),
    'wrong channels': ('cifar10-uncond', lambda path: (path.mkdir(), PIL.Image.new('RGBA', (32, 32)).save(path / 'a_0.png')),
                       'its images have 4 channel(s) (a_0.png: RGBA), not the 3'),
    'truncated image': ('cifar10-uncond', lambda path: (write_folder(path, count=4, resolution=32), truncated(path / 'c0_00000.png')),
                        'cannot read its image c0_00000.png'),
    'cond with 3 classes': ('cifar10-cond', lambda path: write_folder(path, count=6, resolution=32, classes=3),
                            'its file names give 3 classes (c0, c1, c2: the text before the first "_"), not the 10'),
}


# EDM2 reads EDM's zip: the same checks (two here), and ImageNet's 1,000 classes for its img64 row.
EDM2_BAD = {
    'wrong resolution': ('cifar10-uncond', lambda path: edm_zip(path, size=16), 'its images are 16x16 (00000/img00000000.png), not the 32x32'),
    'cond with 5 classes': ('cifar10-cond', lambda path: edm_zip(path, count=5), 'labels give 5 classes (0 to 4), not the 10 classes'),
}

# Each driver, the name its dataset gets here, the make target its refusal names, and its bad datasets.
BAD = [(edm, 'cifar10-32x32.zip', 'make data-cifar10', case, *spec) for case, spec in EDM_BAD.items()] + \
      [(iddpm, 'cifar10-train', 'make data-cifar10-folder', case, *spec) for case, spec in IDDPM_BAD.items()] + \
      [(edm2, 'cifar10-32x32.zip', 'make data-cifar10', case, *spec) for case, spec in EDM2_BAD.items()]


@pytest.mark.parametrize('driver, name, target, case, dataset, make, problem', BAD,
                         ids=[f'{bad[0].__name__.split(".")[-1]}-{bad[3]}' for bad in BAD])
def test_a_bad_dataset_is_refused_in_one_line(driver, name, target, case, dataset, make, problem, monkeypatch, tmp_path):
    data = tmp_path / name
    make(data)
    said = refusal(monkeypatch, driver, dataset, data, tmp_path)
    assert isinstance(said, str) and '\n' not in said, said
    upstream = driver.__name__.split('.')[-1]
    assert said.startswith(f'{upstream}: {data}: ') and problem in said and target in said, said


def test_edm2s_imagenet_row_needs_imagenets_1000_classes(monkeypatch, tmp_path):
    said = refusal(monkeypatch, edm2, 'img64', edm_zip(tmp_path / 'img64.zip', size=64), tmp_path)
    assert 'labels give 10 classes (0 to 9), not the 1000 classes' in said and said.endswith('run `make data-img64 IMAGENET_TRAIN=...`'), said


def test_a_good_iddpm_folder_passes(monkeypatch, tmp_path):
    write_folder(tmp_path / 'train', count=20, resolution=32)
    use_dataset(monkeypatch, 'iddpm', 'cifar10-cond', tmp_path / 'train')
    dry_run(iddpm, 'cifar10-cond', tmp_path) # no exit: checked and passed


def test_a_truncated_smoke_zip_is_written_again(tmp_path, capsys):
    folder = tmp_path / 'edm-smoke'
    data = upstreams.EDM.smoke_data(str(folder))
    whole = zip_members(data)
    truncated(data)
    assert upstreams.EDM.smoke_data(str(folder)) == data
    assert 'not a readable zip, truncated or damaged (File is not a zip file); writing it again' in capsys.readouterr().out
    check_edm_zip(data, 16, 10)
    assert zip_members(data) == whole and sorted(os.listdir(folder)) == ['synthetic-16x16.zip', 'synthetic-images']


def test_a_damaged_smoke_folder_is_written_again(tmp_path, capsys):
    folder = upstreams.IDDPM.smoke_data(str(tmp_path))
    whole = open(os.path.join(folder, 'c0_00000.png'), 'rb').read()
    truncated(os.path.join(folder, 'c0_00000.png'))
    upstreams.IDDPM.smoke_data(str(tmp_path))
    assert 'cannot read its image c0_00000.png' in capsys.readouterr().out
    check_image_folder(folder, 32, 10)
    assert open(os.path.join(folder, 'c0_00000.png'), 'rb').read() == whole


def test_smoke_datasets_are_written_under_a_temporary_name(tmp_path, monkeypatch):
    # Killed while written: the zip (dataset_tool.py, left half written) and the image folder.
    def killed_midwrite(command, tree, dry_run=False):
        dest = next(arg for arg in command if arg.startswith('--dest=')).split('=', 1)[1]
        open(dest, 'wb').write(b'PK\x03\x04 half')
        raise KeyboardInterrupt
    monkeypatch.setattr(upstreams, 'run_step', killed_midwrite)
    with pytest.raises(KeyboardInterrupt):
        upstreams.EDM.smoke_data(str(tmp_path))
    assert not (tmp_path / 'synthetic-16x16.zip').exists()

    saved, calls = PIL.Image.Image.save, []
    def killed_after_three(image, *args, **kwargs):
        calls.append(args)
        if len(calls) > 3:
            raise KeyboardInterrupt
        saved(image, *args, **kwargs)
    monkeypatch.setattr(PIL.Image.Image, 'save', killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        upstreams.IDDPM.smoke_data(str(tmp_path))
    assert not (tmp_path / 'synthetic-32x32').exists()
