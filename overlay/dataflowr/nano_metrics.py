"""What nano diffusion's samples and LoRA layers are scored by: a proxy FID and KID, the share of
each digit, the mean drift, and the Fig. 4 similarity of composition weights between time steps.

The proxy FID is a Frechet distance between generated digits and held-out real digits in the
64-dimensional feature space of a small CNN classifier trained here on the training digits: a
proxy, not Inception FID, so its values are comparable between runs of this project only, and
only at an equal number of samples (FID is biased upward, the more so the fewer the samples). The
proxy KID, in the same features, is unbiased at any sample count. The classifier's test accuracy
on the held-out digits is reported beside them, and its predictions give the share of each digit
class among the samples (a collapse to a few digits shows there).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

import nano_lora
from nano_data import to_model_range
from tools.figures.composition import Axis, cosine_similarity, draw, draw_layers, near_and_far


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


def train_classifier(images, labels, epochs=8, seed=0, device='cpu'):
    """The classifier, initialised and its batches drawn on the CPU (the same on any device), trained on `device`."""
    torch.manual_seed(seed)
    net = DigitClassifier().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = to_model_range(images).to(device), torch.from_numpy(labels).to(device)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def load_or_train_classifier(path, train_images, train_labels, device='cpu'):
    """The proxy FID's classifier kept at `path` (whichever device saved it), on `device`; trained on the
    training digits (and saved there) if missing."""
    if os.path.exists(path):
        classifier = DigitClassifier()
        classifier.load_state_dict(torch.load(path, map_location='cpu'))
        return classifier.to(device).eval()
    classifier = train_classifier(train_images, train_labels, device=device)
    torch.save(classifier.state_dict(), path)
    return classifier


def psd_sqrt(matrix):
    """The symmetric square root of a symmetric positive semi-definite matrix (rounding's tiny negative eigenvalues taken as 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets [N, D].

    tr (S_a S_b)^1/2 is taken as the sum of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2
    (the same eigenvalues as S_a S_b, but of a symmetric matrix): exact for singular covariances too,
    where scipy.linalg.sqrtm(S_a @ S_b) warns "Matrix is singular". They are singular here whatever the
    sample count: about half of the classifier's 64 ReLU features are 0 for every digit."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = psd_sqrt(s_a)
    trace_of_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * trace_of_root)


def kernel_distance(a, b):
    """KID (Binkowski et al. 2018): the unbiased estimate of the squared MMD between two feature sets
    [N, D] and [M, D] under the kernel k(x, y) = (x . y / D + 1)^3. Unbiased at any N, M >= 2 (unlike
    FID): it compares runs scored on few samples, and two sets drawn from one distribution score 0 on
    average (a single draw may be slightly negative)."""
    n, m, width = len(a), len(b), a.shape[1]
    k_aa, k_bb, k_ab = ((x @ y.T / width + 1) ** 3 for x, y in [(a, a), (b, b), (a, b)])
    return float((k_aa.sum() - np.trace(k_aa)) / (n * (n - 1)) + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1)) - 2 * k_ab.mean())


def digit_shares(predicted):
    """The share of each digit 0-9 among the predicted classes, rounded to 3 decimals."""
    return [round(float(share), 3) for share in np.bincount(predicted, minlength=10) / len(predicted)]


def evaluate(sample_sets, train_images, train_labels, held_out_images, held_out_labels, classifier_cache, device='cpu'):
    """Metrics of each set of generated digits (uint8 [N, 32, 32], or real 28-pixel ones) against the
    held-out real ones, a dict a set; the classifier is loaded (or trained) and the real digits
    embedded once for all, on `device`."""
    classifier = load_or_train_classifier(classifier_cache, train_images, train_labels, device)
    with torch.no_grad():
        real = classifier.embed(to_model_range(held_out_images).to(device))
        accuracy = (classifier.head(real).argmax(1).cpu().numpy() == held_out_labels).mean()
    real = real.double().cpu().numpy()
    metrics = []
    for sample_pixels in sample_sets:
        with torch.no_grad():
            generated = classifier.embed(to_model_range(sample_pixels).to(device))
            predicted = classifier.head(generated).argmax(1).cpu().numpy()
        generated = generated.double().cpu().numpy()
        metrics.append(dict(
            proxy_fid=round(frechet_distance(generated, real), 3),
            proxy_fid_note=f'Frechet distance in a small MNIST classifier\'s 64-d features, {len(generated)} generated vs '
                           f'{len(real)} held-out digits; not Inception FID; biased upward at few samples: compare at equal counts',
            proxy_kid=round(kernel_distance(generated, real), 3),
            proxy_kid_note='KID (unbiased squared MMD, cubic polynomial kernel) in the same features; about 0 for real digits',
            classifier_test_accuracy=round(float(accuracy), 4),
            class_shares=digit_shares(predicted),
            held_out_digits=len(held_out_labels),
        ))
    return metrics


def mean_drift(samples, real):
    """How far the samples' image means (model range, [N, 1, 32, 32]) stray from those of real digits.

    MyTinyUNet is blind to its input's mean, so nothing in the sampler holds a sample's mean where
    digits have it: each step divides it by sqrt(alpha_t), 1 / sqrt(alpha_bar_T) over the 1000 steps
    (157x for the notebook's betas), and a sample whose mean leaves the real range comes out all
    white or all black. nano.py --sampler clip-x0 bounds the drift to [-1, 1] (not to the real range).
    """
    sample_means, real_means = samples.mean(dim=(1, 2, 3)), real.mean(dim=(1, 2, 3))
    low, high = real_means.min(), real_means.max()
    return dict(
        off_range_share=round(float(((sample_means < low) | (sample_means > high)).float().mean()), 3),
        sample_mean_std=round(float(sample_means.std()), 3),
        real_mean_std=round(float(real_means.std()), 3),
    )


def rescaled_pixels(samples):
    """Each sample (model range, [N, 1, 32, 32]) stretched from its own minimum to its own maximum ->
    uint8, as the notebook's plt.imshow shows it: the view of the shapes whatever the mean drift
    (tools.figures.images.to_uint8 gives the de-normalised view, where a drifted sample is one colour)."""
    low = samples.amin(dim=(1, 2, 3), keepdim=True)
    high = samples.amax(dim=(1, 2, 3), keepdim=True)
    return ((samples - low) / (high - low).clamp_min(1e-8) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------- Fig. 4 / Fig. 7

SIMILARITY_STEPS = torch.arange(0, 1000, 10)
# Near steps: 0 < |t - t'| <= 50; far ones: |t - t'| >= 500 (tools.figures.composition: fractions of the T = 1000 steps).
STEPS_AXIS = Axis(values=SIMILARITY_STEPS.numpy(), label='t', log=False, span=1000)


def layer_names(network):
    """The LoRA layers' module names, in the order of nano_lora.composition_weights (b1.0.conv1 ... b_out.2.conv1)."""
    return [f'{block}.{i}.conv1' for block in nano_lora.BLOCKS for i in range(len(getattr(network, block)))]


def similarity_between_steps(network, steps=SIMILARITY_STEPS):
    """Each LoRA layer's cosine similarity of its composition weights between the given time steps, [layers, S, S]."""
    with torch.no_grad():
        weights = nano_lora.composition_weights(network, steps)
    return torch.stack([cosine_similarity(w) for w in weights])


def omega_similarity(network, initial_network, out_path, title):
    """Fig. 4 / Fig. 7: cosine similarity of the composition weights between time steps, per LoRA layer
    and averaged, as a PNG and (for the comparison's figure) an .npz; returns how alike near steps
    and far ones are, after training (`network`) and at initialisation (`initial_network`): is the
    diagonal learned, or kept from the start?"""
    layers = similarity_between_steps(network)
    mean, mean_at_init = layers.mean(0).numpy(), similarity_between_steps(initial_network).mean(0).numpy()
    (near, far), (near_at_init, far_at_init) = near_and_far(mean, STEPS_AXIS), near_and_far(mean_at_init, STEPS_AXIS)
    np.savez(out_path.replace('.png', '.npz'), steps=SIMILARITY_STEPS.numpy(), mean=mean, layers=layers.numpy(), mean_at_init=mean_at_init)
    plot_omega_similarity(mean, layers.numpy(), layer_names(network), out_path, title,
                          f'near {near:.2f}, far {far:.2f}; at initialisation {near_at_init:.2f}, {far_at_init:.2f}')
    return dict(omega_similarity_near=round(near, 3), omega_similarity_far=round(far, 3),
                omega_similarity_near_at_init=round(near_at_init, 3), omega_similarity_far_at_init=round(far_at_init, 3))


def plot_omega_similarity(mean, layers, names, out_path, title, summary):
    """The heatmaps: the mean over layers, large, and each layer's (3 rows of 7, in network order b1 ... b_out)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(16, 5.4))
    left, right = fig.add_gridspec(1, 2, width_ratios=[1, 1.7], wspace=0.2)
    ax = fig.add_subplot(left)
    image = draw(ax, mean, STEPS_AXIS)
    ax.set_title(f'{title}: mean over {len(layers)} layers')
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    draw_layers(fig, right, layers, names, STEPS_AXIS, rows=3, columns=7, hspace=0.45, wspace=0.15)
    fig.suptitle(f'cosine similarity of composition weights between time steps ({summary})')
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
