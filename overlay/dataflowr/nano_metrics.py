"""Sample quality of nano diffusion on MNIST: a proxy FID and the share of each digit.

The proxy FID is a Frechet distance between generated digits and held-out real digits in the
64-dimensional feature space of a small CNN classifier trained here on the training digits: a
proxy, not Inception FID, so its values are comparable between runs of this project only. The
classifier's test accuracy on the held-out digits is reported beside it, and its predictions give
the share of each digit class among the samples (a collapse to a few digits shows there).
"""

import gzip
import os

import numpy as np
import PIL.Image
import scipy.linalg
import torch
import torch.nn.functional as F


def read_mnist_idx(folder):
    """The official MNIST training files (idx format, gzipped) -> (images [N, 28, 28] uint8, labels [N])."""
    with gzip.open(os.path.join(folder, 'train-images-idx3-ubyte.gz')) as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(folder, 'train-labels-idx1-ubyte.gz')) as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return images, labels


def as_input(images):
    """uint8 [N, H, W] (28 or 32 pixels) -> float [N, 1, 32, 32] in [-1, 1], as nano diffusion sees digits."""
    if images.shape[1] != 32:
        images = np.stack([np.asarray(PIL.Image.fromarray(image).resize((32, 32), PIL.Image.BILINEAR)) for image in images])
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1)[:, None]


class DigitClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.features = torch.nn.Linear(32 * 8 * 8, 64)
        self.head = torch.nn.Linear(64, 10)

    def embed(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.features(x.flatten(1)))

    def forward(self, x):
        return self.head(self.embed(x))


def train_classifier(images, labels, epochs=8, seed=0):
    torch.manual_seed(seed)
    net = DigitClassifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = as_input(images), torch.from_numpy(labels)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets [N, D]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * np.real(root)))


def evaluate(sample_sets, train_images, train_labels, held_out_images, held_out_labels, classifier_cache):
    """Metrics of each set of generated digits (uint8 [N, 32, 32]) against the held-out real ones,
    a dict a set; the classifier is loaded (or trained) and the real digits embedded once for all."""
    if os.path.exists(classifier_cache):
        classifier = DigitClassifier()
        classifier.load_state_dict(torch.load(classifier_cache))
        classifier.eval()
    else:
        classifier = train_classifier(train_images, train_labels)
        torch.save(classifier.state_dict(), classifier_cache)
    with torch.no_grad():
        real = classifier.embed(as_input(held_out_images))
        accuracy = (classifier.head(real).argmax(1).numpy() == held_out_labels).mean()
    metrics = []
    for sample_pixels in sample_sets:
        with torch.no_grad():
            generated = classifier.embed(as_input(sample_pixels))
            predicted = classifier.head(generated).argmax(1).numpy()
        metrics.append(dict(
            proxy_fid=round(frechet_distance(generated.double().numpy(), real.double().numpy()), 3),
            proxy_fid_note='Frechet distance in a small MNIST classifier\'s 64-d features, generated vs held-out digits; not Inception FID',
            classifier_test_accuracy=round(float(accuracy), 4),
            class_shares=[round(float(share), 3) for share in np.bincount(predicted, minlength=10) / len(predicted)],
            held_out_digits=len(held_out_labels),
        ))
    return metrics


def mean_drift(samples, real):
    """How far the samples' image means (model range, [N, 1, 32, 32]) stray from those of real digits.

    MyTinyUNet is blind to its input's mean, so nothing in the sampler holds a sample's mean where
    digits have it: each step divides it by sqrt(alpha_t), 1 / sqrt(alpha_bar_T) over the 1000 steps
    (157x for the notebook's betas), and a sample whose mean leaves the real range comes out all
    white or all black.
    """
    sample_means, real_means = samples.mean(dim=(1, 2, 3)), real.mean(dim=(1, 2, 3))
    low, high = real_means.min(), real_means.max()
    return dict(
        off_range_share=round(float(((sample_means < low) | (sample_means > high)).float().mean()), 3),
        sample_mean_std=round(float(sample_means.std()), 3),
        real_mean_std=round(float(real_means.std()), 3),
    )
