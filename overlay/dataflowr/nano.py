#!/usr/bin/env python3
"""Train Dataflowr's nano diffusion on MNIST with a chosen conditioning, sample, and score it.

    python nano.py --cond uclora --out runs/nano-uclora
    python nano.py --cond timelora --omega-init random --epochs 100 --data mnist5k --out runs/nano-random
    python nano.py --cond uclora --sampler clip-x0 --out runs/nano-uclora   # the same run, sampled again with clipping

The model and the DDPM process are the notebook's own (nano_diffusion.py, with the sinusoidal fix
and the LoRA hooks of patches/dataflowr); so is every training step (DDPM.add_noise, the MSE on the
noise) and, by default, every sampler step (DDPM.step on DDPM.reverse). This file adds what a run
needs: data (nano_data.py), a progress bar, a checkpoint every epoch (rerunning the same command
resumes exactly where it stopped), seeded sampling, sample grids (de-normalised, and rescaled per
digit) and a loss curve as PNG, and metrics.json with the scores of nano_metrics.py. Budgets are
also reported in optimizer steps and images seen.

Departures from the notebook, opt-in: --sampler clip-x0 clips the predicted clean digit to
[-1, 1] at every step (improved-diffusion's clip_denoised), which bounds the drift of the samples'
means (MyTinyUNet cannot see its input's mean: see nano_metrics.mean_drift); with it, --sample-steps
K < 1000 visits K of the 1000 steps, evenly spaced, with the schedule respaced over them
(improved-diffusion's timestep_respacing): the same network, K network calls a sample.

--device runs the networks (diffusion and digit classifier) on a GPU; every random draw (data
order, training noise, sampling noise) stays on the CPU's generator, so a seed gives the same draws
on any device, and the DDPM's few elementwise operations run there beside them.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

try: # first: nano_data needs it too
    from tools.figures.images import save_grid, to_uint8
    from tools.vendoring.run import working_in
except ImportError:
    sys.exit("nano: needs the project's tools package on the path (make setup installs it into .venv)")

import nano_data
import nano_diffusion as nd
import nano_lora
import nano_metrics

# Options a checkpoint may be resumed with other values of (the rest must match).
FREE_ON_RESUME = ('epochs', 'samples', 'out', 'classifier', 'sampler', 'sample_steps', 'device')
SAMPLERS = ('notebook', 'clip-x0')


def device_name(name):
    """--device: a device this machine has (cpu, cuda, cuda:N, mps), kept as its name (a checkpoint's options are plain values)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda', 'mps'):
        raise argparse.ArgumentTypeError(f'{name}: not a device (give cpu, cuda, cuda:N or mps)')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f'{name}: this machine has no CUDA device (or this PyTorch, {torch.__version__}, has no CUDA)')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f'{name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 onwards')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f'{name}: this machine has no MPS device')
    return name


def parse_args():
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
    parser.add_argument('--sampler', choices=SAMPLERS, default='notebook',
                        help="notebook: the notebook's DDPM.step; clip-x0: the same step with the predicted clean digit clipped to [-1, 1] "
                             "(improved-diffusion's clip_denoised; not in the notebook), which bounds the drift of the samples' means")
    parser.add_argument('--sample-steps', type=int, default=1000,
                        help="steps of the clip-x0 sampler: 1000 (all), or K of them evenly spaced from 999 to 0, the schedule respaced "
                             "(improved-diffusion's timestep_respacing); K network calls a sample. The notebook's sampler runs all 1000")
    parser.add_argument('--device', type=device_name, default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='where the networks run (default: cuda if there is one, else cpu); random draws stay on the CPU, the same on any device')
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
    if not 2 <= args.sample_steps <= 1000:
        parser.error(f'--sample-steps must be between 2 and 1000 (the process has 1000 steps), got {args.sample_steps}')
    if args.sample_steps != 1000 and args.sampler == 'notebook':
        parser.error("--sample-steps below 1000 needs --sampler clip-x0: the notebook's DDPM.step takes every one of the 1000 steps")
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, '.writable')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as err:
        parser.error(f'--out {args.out}: cannot write there ({err.strerror})')
    return parser, args


def build_network(args):
    """MyTinyUNet as the options say, initialised from --seed (the time embedding: the fixed one, or
    the notebook's original that patches/dataflowr/0001 keeps as notebook_sinusoidal_embedding)."""
    torch.manual_seed(args.seed)
    network = nd.MyTinyUNet(cond=args.cond, lora_bases=args.lora_bases, lora_rank=args.lora_rank, omega_init=args.omega_init)
    if args.embedding == 'notebook':
        network.time_embed.weight.data = nd.notebook_sinusoidal_embedding(1000, 100)
    return network


def adam(network, lr, device):
    """The notebook's optimizer, Adam, as one fused kernel where torch has one (CPU and CUDA): the same update to
    rounding, in one pass instead of a dozen small operations per parameter tensor (UC-LoRA's MyTinyUNet has
    371 tensors; on 2 CPU cores the unfused step took 37 ms of a 800 ms training step, the fused one 8 ms)."""
    return torch.optim.Adam(network.parameters(), lr=lr, fused=True if torch.device(device).type in ('cpu', 'cuda') else None)


def resume(checkpoint_path, args, network, optimizer):
    """The run's state, from its checkpoint if there is one (network, optimizer and random state
    restored); ValueError if that checkpoint was written with other options."""
    if not os.path.exists(checkpoint_path):
        return dict(epoch=0, losses=[])
    saved = torch.load(checkpoint_path, map_location='cpu', weights_only=False) # written on any device
    changed = {k: (saved['options'].get(k), v) for k, v in vars(args).items() if k not in FREE_ON_RESUME and saved['options'].get(k) != v}
    if changed:
        raise ValueError(f'{checkpoint_path} was written with other options {changed}; use another --out')
    network.load_state_dict(saved['network'])
    optimizer.load_state_dict(saved['optimizer'])
    torch.random.set_rng_state(saved['torch_rng'])
    return dict(epoch=saved['epoch'], losses=saved['losses'])


def train(model, optimizer, train_x, state, args, checkpoint_path):
    """Train from state['epoch'] to --epochs on the notebook's noise-prediction loss; a checkpoint
    ends every epoch (written whole, then renamed). Appends to state['losses']; returns the seconds.
    The batches, noise and time steps are drawn and noised on the CPU (model: a DDPM on the CPU), the
    network runs on --device."""
    steps_per_epoch = int(np.ceil(len(train_x) / args.batch_size))
    start_time = time.time()
    for epoch in range(state['epoch'], args.epochs):
        model.network.train()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        bar = tqdm(range(steps_per_epoch), desc=f'epoch {epoch + 1}/{args.epochs}', leave=False, disable=None) # a bar on terminals only
        for step in bar:
            batch = train_x[order[step * args.batch_size:(step + 1) * args.batch_size]]
            noise = torch.randn(batch.shape)
            timesteps = torch.randint(0, model.num_timesteps, (batch.shape[0],)).long()
            noisy = model.add_noise(batch, noise, timesteps)
            loss = F.mse_loss(model.reverse(noisy.to(args.device), timesteps.to(args.device)), noise.to(args.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state['losses'].append(loss.item())
            bar.set_postfix(loss=f'{loss.item():.4f}')
        state['epoch'] = epoch + 1
        torch.save(dict(network=model.network.state_dict(), optimizer=optimizer.state_dict(), torch_rng=torch.random.get_rng_state(),
                        epoch=state['epoch'], losses=state['losses'], options=vars(args)), checkpoint_path + '.partial')
        os.replace(checkpoint_path + '.partial', checkpoint_path)
        print(f'epoch {epoch + 1}/{args.epochs}: loss {np.mean(state["losses"][-steps_per_epoch:]):.4f}, {time.time() - start_time:.0f} s')
    return time.time() - start_time


def spaced_steps(num_timesteps, count):
    """count of the time steps num_timesteps - 1 .. 0, evenly spaced, both ends kept, in sampling order
    (improved-diffusion's space_timesteps for one section)."""
    stride = (num_timesteps - 1) / (count - 1)
    return [round(i * stride) for i in range(count - 1, -1, -1)]


def clipped_step(model, model_output, timestep, sample, previous=None):
    """DDPM.step (same first arguments) with the predicted clean digit clipped to the data's range [-1, 1],
    as improved-diffusion's clip_denoised: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clamped,
    then the mean of the posterior q(x_s | x_t, x0) for the previous visited step s (t - 1 unless given;
    -1: none, the end), plus DDPM.step's kind of noise (sqrt(beta) z for t > 0, z drawn as it draws it),
    beta = 1 - abar_t / abar_s the respaced schedule's (beta_t itself for s = t - 1). For an x0 inside
    [-1, 1] and s = t - 1 that mean is DDPM.step's mean, so the two samplers differ only by the clipping.
    Not in the notebook: a sample's mean, which MyTinyUNet cannot see and DDPM.step divides by
    sqrt(alpha_t) at every step, can then no longer leave [-1, 1]."""
    t = int(timestep)
    s = t - 1 if previous is None else previous
    # The notebook's betas; what derives from them in float64, as improved-diffusion does (1 - alpha_bar_0
    # in float32 is 2e-4 off, which would scale the last step's x0 by 0.9998).
    alpha_bar = torch.cumprod(1 - model.betas.double(), 0)
    alpha_bar_prev = alpha_bar[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64)
    beta = 1 - alpha_bar[t] / alpha_bar_prev
    x0 = ((sample - (1 - alpha_bar[t]).sqrt() * model_output) / alpha_bar[t].sqrt()).clamp(-1, 1)
    mean = (alpha_bar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - alpha_bar_prev) * sample) / (1 - alpha_bar[t])
    if t > 0:
        mean = mean + beta.float() ** 0.5 * torch.randn_like(model_output)
    return mean.float()


def sample(model, count, seed, sampler='notebook', device='cpu', batch=256, steps=1000):
    """count samples in the model's range with the 1000-step sampler (DDPM.step, or clipped_step for
    sampler 'clip-x0', which may visit fewer steps), seeded, in batches. The network runs on `device`;
    each step (its noise and arithmetic) on the CPU beside the DDPM's schedules, so a seed gives the
    same noise on any device."""
    visited = spaced_steps(model.num_timesteps, steps)
    if sampler == 'notebook' and len(visited) != model.num_timesteps:
        raise ValueError("the notebook's sampler takes every step")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model.eval()
    samples = []
    with torch.inference_mode(): # no autograd bookkeeping at all: the same numbers as no_grad, in less time
        for start in range(0, count, batch):
            n = min(batch, count - start)
            x = torch.randn(n, 1, 32, 32)
            for t, previous in tqdm(list(zip(visited, visited[1:] + [-1])), desc=f'sampling {start + n}/{count}', leave=False, disable=None):
                time_tensor = (torch.ones(n, 1) * t).long()
                model_output = model.reverse(x.to(device), time_tensor.to(device)).cpu()
                if sampler == 'notebook':
                    x = model.step(model_output, time_tensor[0], x)
                else:
                    x = clipped_step(model, model_output, time_tensor[0], x, previous)
            samples.append(x)
            print(f'sampled {start + n}/{count} digits ({len(visited)} steps each, {sampler} sampler)')
    torch.random.set_rng_state(generator_state)
    return torch.cat(samples)


def kept_or_new_samples(model, epoch, args):
    """(samples, seconds it took to draw them, device they were drawn on): those kept in samples.pt for
    this checkpoint, seed, sampler and steps, so that scoring again costs no sampling, or new ones (then kept there)."""
    samples_path = os.path.join(args.out, 'samples.pt')
    saved = torch.load(samples_path, map_location='cpu') if os.path.exists(samples_path) else {}
    # Files written before --sampler (--sample-steps) existed hold the notebook's samples (of 1000 steps), drawn on the CPU.
    drawn_by = saved.get('sampler', 'notebook'), saved.get('steps', 1000)
    if (saved.get('epoch'), saved.get('seed'), drawn_by) == (epoch, args.seed, (args.sampler, args.sample_steps)) and len(saved['samples']) >= args.samples:
        print(f'reusing the {args.samples} samples ({args.sampler} sampler, {args.sample_steps} steps) in {samples_path}')
        return saved['samples'][:args.samples], saved['seconds'], saved.get('device', 'cpu')
    start_time = time.time()
    samples = sample(model, args.samples, seed=args.seed + 1, sampler=args.sampler, device=args.device, steps=args.sample_steps)
    seconds = time.time() - start_time
    torch.save(dict(epoch=epoch, seed=args.seed, sampler=args.sampler, steps=args.sample_steps, samples=samples, seconds=seconds,
                    device=args.device), samples_path)
    return samples, seconds, args.device


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


def score(samples, network, args, digits):
    """(scores of the samples, omega similarity of a LoRA run) for metrics.json, and the PNGs they come with:
    samples.png (de-normalised), samples-rescaled.png (each digit stretched to its own range), for LoRA
    runs omega_similarity.png. Real training digits, as many as the samples, are scored beside them
    (5 draws, the same for every run): the proxy FID and KID of a perfect model at this sample count,
    and their spread between draws."""
    (train_images, train_labels), (held_out_images, held_out_labels) = digits
    pixels, rescaled_pixels = to_uint8(samples)[:, 0], nano_metrics.rescaled_pixels(samples)[:, 0].numpy()
    draw = np.random.default_rng(0)
    real_sets = [train_images[draw.choice(len(train_images), min(len(samples), len(train_images)), replace=False)] for _ in range(5)]
    # 16 a row, or, for a count that does not fill rows of 16, the squarest grid without an empty (black) place,
    # which would read as a black sample.
    columns = 16 if min(len(pixels), 128) % 16 == 0 else None
    save_grid(pixels[:128], os.path.join(args.out, 'samples.png'), columns=columns, scale=2)
    save_grid(rescaled_pixels[:128], os.path.join(args.out, 'samples-rescaled.png'), columns=columns, scale=2)
    similarity = {}
    if args.cond != 'shift': # the composition weights: a few hundred numbers, read on the CPU beside the initial network's
        similarity = nano_metrics.omega_similarity(network.cpu(), build_network(args), os.path.join(args.out, 'omega_similarity.png'), args.cond)
    metrics, rescaled, *real = nano_metrics.evaluate([pixels, rescaled_pixels, *real_sets], train_images, train_labels, held_out_images,
                                                     held_out_labels, args.classifier or os.path.join(args.out, 'digit-classifier.pt'), args.device)
    real_fids, real_kids = [m['proxy_fid'] for m in real], [m['proxy_kid'] for m in real]
    metrics.update(proxy_fid_rescaled=rescaled['proxy_fid'], proxy_kid_rescaled=rescaled['proxy_kid'], class_shares_rescaled=rescaled['class_shares'],
                   real_digits_proxy_fid=round(float(np.mean(real_fids)), 3), real_digits_proxy_fid_std=round(float(np.std(real_fids)), 3),
                   real_digits_proxy_kid=round(float(np.mean(real_kids)), 3), real_digits_proxy_kid_std=round(float(np.std(real_kids)), 3),
                   real_digits_note=f'{len(real_sets)} draws of {len(real_sets[0])} real training digits scored as the samples are: '
                                    'a perfect model\'s scores at this count (mean and std over the draws)',
                   **nano_metrics.mean_drift(samples, nano_data.to_model_range(held_out_images)))
    return metrics, similarity


def main():
    parser, args = parse_args()
    # Ctrl-C or SIGTERM: one line, no traceback (the checkpoint of the last finished epoch is kept);
    # a second nano.py on the same --out refuses instead of writing beside this one.
    with working_in(args.out, f'nano: {args.out}'):
        run(parser, args)


def run(parser, args):
    try:
        images, labels = nano_data.load_digits(args.data)
    except nano_data.DataError as err:
        sys.exit(f'nano: {err}')
    (train_images, train_labels), held_out = nano_data.split(images, labels)
    train_x = nano_data.to_model_range(train_images[:args.train_digits])

    network = build_network(args).to(args.device)
    # The DDPM's schedules stay on the CPU, where every random draw is made (the same draws on any device).
    model = nd.DDPM(network, 1000, beta_start=0.0001, beta_end=0.02, device=torch.device('cpu'))
    optimizer = adam(network, args.lr, args.device)
    steps_per_epoch = int(np.ceil(len(train_x) / args.batch_size))
    checkpoint_path = os.path.join(args.out, 'checkpoint.pt')
    try:
        state = resume(checkpoint_path, args, network, optimizer)
    except ValueError as err:
        parser.error(str(err))
    if state['epoch']:
        print(f'resuming {args.out} after epoch {state["epoch"]} ({state["epoch"] * steps_per_epoch} steps)')
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    print(f'nano diffusion, cond={args.cond}' + (f' (omega init: {args.omega_init})' if args.cond == 'timelora' else '') +
          f': {trainable:,} trainable parameters; {len(train_x)} training digits, {steps_per_epoch} steps an epoch; on {args.device}')
    train_seconds = train(model, optimizer, train_x, state, args, checkpoint_path)
    if args.samples == 0:
        return

    save_loss_curve(state['losses'], steps_per_epoch, os.path.join(args.out, 'loss.png'), f'nano diffusion, {args.cond}')
    samples, sample_seconds, sample_device = kept_or_new_samples(model, state['epoch'], args)
    start_time = time.time()
    metrics, similarity = score(samples, network, args, ((train_images, train_labels), held_out))
    metrics.update(cond=args.cond, omega_init=args.omega_init if args.cond == 'timelora' else None, epochs=state['epoch'],
                   optimizer_steps=state['epoch'] * steps_per_epoch, images_seen=state['epoch'] * len(train_x),
                   batch_size=args.batch_size, lr=args.lr, seed=args.seed, data=args.data, samples=args.samples, sampler=args.sampler,
                   sample_steps=args.sample_steps,
                   trainable_parameters=trainable, final_epoch_loss=float(np.mean(state['losses'][-steps_per_epoch:])),
                   device=args.device, train_seconds_this_run=round(train_seconds, 1), sample_device=sample_device,
                   sample_seconds=round(sample_seconds, 1), score_seconds=round(time.time() - start_time, 1), **similarity)
    with open(os.path.join(args.out, 'metrics.json'), 'w') as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps({k: metrics[k] for k in ['sampler', 'sample_steps', 'proxy_fid', 'proxy_kid', 'real_digits_proxy_fid', 'real_digits_proxy_kid',
                                              'off_range_share', 'classifier_test_accuracy', 'class_shares', 'optimizer_steps']}, indent=None))
    print(f'wrote {args.out}/samples.png, samples-rescaled.png, loss.png, metrics.json')


if __name__ == '__main__':
    main()
