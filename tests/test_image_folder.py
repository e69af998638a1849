"""tools/data/image_folder.py: CIFAR-10's python archive and image_sample.py's .npz to image folders."""

import io
import os
import pickle
import tarfile

import numpy as np
import PIL.Image

from conftest import tool
from tools.data import image_folder


def test_cifar10_archive_becomes_class_named_pngs(tmp_path):
    # The real archive's layout and pickles (five training batches of CHW rows), random pixels, 4 images a batch.
    rng = np.random.default_rng(0)
    batches = []
    archive = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        for batch in range(1, 6):
            data = {b'data': rng.integers(0, 256, (4, 3072), dtype=np.uint8), b'labels': list(rng.integers(0, 10, 4))}
            batches.append(data)
            raw = pickle.dumps(data)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{batch}')
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    out = tmp_path / 'train'
    image_folder.write_images(image_folder.cifar10_batches(archive), 20, str(out))
    names = sorted(os.listdir(out))
    assert len(names) == 20
    # Image 13 is batch 4, row 1: 1024 red, then green, then blue values.
    name = next(n for n in names if n.endswith('_00013.png'))
    row = batches[3]
    assert name.split('_')[0] == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'][row[b'labels'][1]]
    expected = row[b'data'][1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(PIL.Image.open(out / name)), expected)
    assert sorted(os.listdir(tmp_path)) == ['cifar-10-python.tar.gz', 'train'], 'no partial folder left behind'


def test_npz_samples_become_pngs_and_a_second_run_keeps_them(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / 'samples_5x32x32x3.npz', images, np.arange(5))
    out = tmp_path / 'png'
    for _ in range(2):
        result = tool('data.image_folder', 'npz', tmp_path / 'samples_5x32x32x3.npz', out)
        assert result.returncode == 0, result.stderr
    assert 'already there' in result.stdout
    assert np.array_equal(np.asarray(PIL.Image.open(out / '000003.png')), images[3])


def test_missing_input_is_a_usage_error(tmp_path):
    result = tool('data.image_folder', 'cifar10', tmp_path / 'nope.tar.gz', tmp_path / 'out')
    assert result.returncode == 2 and 'no such file' in result.stderr and 'Traceback' not in result.stderr


def test_a_folder_of_another_count_is_refused_before_writing(tmp_path):
    # write_images renames a whole folder into place: one with another count is not its own (or damaged), and is not
    # replaced; refused at once, not after writing all the images.
    np.savez(tmp_path / 'samples.npz', np.zeros((3, 32, 32, 3), dtype=np.uint8))
    (tmp_path / 'png').mkdir()
    (tmp_path / 'png' / 'other.png').write_bytes(b'')
    result = tool('data.image_folder', 'npz', tmp_path / 'samples.npz', tmp_path / 'png')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == f'image_folder: {tmp_path / "png"} holds 1 files, not the 3 images expected; remove it and run again'
    assert not (tmp_path / 'png.partial').exists()
