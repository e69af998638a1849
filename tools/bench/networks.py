"""Whole-network benchmark: each paper network without and with its LoRA conditioning, side by side.

    python -m tools.bench.networks                     # CPU, reduced batches (make bench)
    python -m tools.bench.networks --device cuda       # GPU, the paper's batches, fp32 and TF32 (make bench DEVICE=cuda)
    python -m tools.bench.networks --tiny --out /tmp/b # tiny networks, one round (the test suite)

Networks (built from the table of paper rows, tools/paper/rows.py, with the upstream's own code):
EDM DDPM++ CIFAR-10 (baseline, only LoRA, with LoRA, adaLN; conditional baseline and ClassLoRA),
improved-diffusion CIFAR-10 (baseline, TimeLoRA; conditional baseline and TimeLoRA + ClassLoRA),
nano diffusion (the notebook's shift, TimeLoRA, UC-LoRA), and EDM2's CIFAR-10 recipe (baseline, with LoRA,
only LoRA; not in the paper). What is timed:
- train step: forward with the upstream's loss, backward, Adam step;
- sampling evaluation: one network call as the samplers make it, one condition for the whole batch
  (EDM: a single sigma; improved-diffusion and nano: the same time step for every sample);
- peak memory: CUDA's peak allocation (GPU), or the process's peak resident set (CPU).

Each variant lives in its own process on the same device (memory is its own), and the processes take
turns: a round times one block of each variant in turn, so that drifts in machine load hit all alike.
A ratio is the median over rounds of (variant / baseline) within a round; its spread is the range of
those per-round ratios. Writes <out>/<device>.json and <device>.md (a markdown table).
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback

from tools import ROOT
from tools.paper.params import edm2_network_kwargs, edm2_preset, edm_network_kwargs, iddpm_options
from tools.paper.rows import find, flag_value
from tools.vendoring.run import interruptible
from tools.vendoring.upstream import import_vendor_tree

#----------------------------------------------------------------------------
# What is measured: (network, variant, the paper row it builds, the variant it is compared with).

NETWORKS = {
    'edm-cifar10-uncond': dict(title='EDM DDPM++ CIFAR-10 uncond', upstream='edm', dataset='cifar10-uncond',
                               variants=['baseline', 'only-lora', 'with-lora', 'adaln']),
    'edm-cifar10-cond': dict(title='EDM DDPM++ CIFAR-10 cond', upstream='edm', dataset='cifar10-cond',
                             variants=['baseline', 'classlora']),
    'iddpm-cifar10-uncond': dict(title='IDDPM CIFAR-10 uncond', upstream='iddpm', dataset='cifar10-uncond',
                                 variants=['baseline', 'with-lora']),
    'iddpm-cifar10-cond': dict(title='IDDPM CIFAR-10 cond', upstream='iddpm', dataset='cifar10-cond',
                               variants=['baseline', 'with-lora']),
    'nano-mnist': dict(title='nano diffusion MNIST', upstream='dataflowr', dataset='mnist',
                       variants=['shift', 'timelora-interp', 'uclora']),
    'edm2-cifar10-uncond': dict(title='EDM2 (img64-s at 32x32) CIFAR-10 uncond', upstream='edm2', dataset='cifar10-uncond',
                                variants=['baseline', 'with-lora', 'only-lora']),
}
VARIANT_LABELS = {('iddpm', 'with-lora'): 'TimeLoRA (+ ClassLoRA when cond)'}

# Batch, calls per timed block and rounds, per device. GPU: the paper's batch for EDM as each of its 8 GPUs
# computes it (512 / 8), improved-diffusion's 128, the notebook's 128; CPU: reduced. Nano diffusion on the CPU:
# blocks of one training step (about a second) and many rounds, because a shared host's speed drifts within
# seconds; alternating short blocks lets a drift hit all variants alike.
SETTINGS = {
    'cuda': {'edm': dict(batch=64, train_calls=5, sample_calls=10, rounds=7), 'iddpm': dict(batch=128, train_calls=5, sample_calls=10, rounds=7),
             'dataflowr': dict(batch=128, train_calls=20, sample_calls=50, rounds=7), 'edm2': dict(batch=64, train_calls=5, sample_calls=10, rounds=7)},
    'cpu': {'edm': dict(batch=2, train_calls=1, sample_calls=2, rounds=7), 'iddpm': dict(batch=2, train_calls=1, sample_calls=2, rounds=7),
            'dataflowr': dict(batch=128, train_calls=1, sample_calls=3, rounds=21), 'edm2': dict(batch=2, train_calls=1, sample_calls=2, rounds=7)},
    'tiny': {'edm': dict(batch=2, train_calls=1, sample_calls=1, rounds=1), 'iddpm': dict(batch=2, train_calls=1, sample_calls=1, rounds=1),
             'dataflowr': dict(batch=4, train_calls=1, sample_calls=1, rounds=1), 'edm2': dict(batch=2, train_calls=1, sample_calls=1, rounds=1)},
}

# The targets (ratio to the baseline, at most), by device and mode; None: reported only.
TARGETS = {
    'cpu': {('nano-mnist', 'timelora-interp', 'train'): 1.5, ('nano-mnist', 'uclora', 'train'): 1.5,
            ('nano-mnist', 'timelora-interp', 'sample'): 1.02, ('nano-mnist', 'uclora', 'sample'): 1.02,
            ('edm-cifar10-uncond', 'with-lora', 'sample'): 1.02, ('edm-cifar10-uncond', 'only-lora', 'sample'): 1.02,
            ('edm2-cifar10-uncond', 'with-lora', 'sample'): 1.02, ('edm2-cifar10-uncond', 'only-lora', 'sample'): 1.02}, # issue 25
    'cuda': {('edm-cifar10-uncond', 'with-lora', 'train'): 1.015, ('edm-cifar10-uncond', 'with-lora', 'memory'): 1.013,
             ('edm-cifar10-uncond', 'with-lora', 'sample'): 1.005},
}

#----------------------------------------------------------------------------
# One variant: its network built as the upstream's training script would, and the two timed calls.

def build_edm(row, device, tiny, batch):
    import torch
    import dnnlib
    from training.loss import EDMLoss
    kwargs = edm_network_kwargs(row)
    if tiny:
        kwargs.update(model_channels=16, channel_mult=[1,1], num_blocks=1)
    net = dnnlib.util.construct_class_by_name(**kwargs).to(device).train()
    loss_fn = EDMLoss()
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.eye(10, device=device)[torch.arange(batch, device=device) % 10] if net.label_dim else None
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    return (net, *denoiser_calls(net, loss_fn, optimizer, images, labels))


def denoiser_calls(net, loss_fn, optimizer, images, labels):
    """(train_step, sample_call) of an EDM-style denoiser (EDM's and EDM2's): the loss over the batch, and one call at
    a single sigma for the whole batch, as both upstreams' edm_sampler makes it."""
    import torch
    def train_step():
        loss = loss_fn(net=net, images=images, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().mul(1 / len(images)).backward()
        optimizer.step()

    sigma = torch.tensor(2.5, device=images.device)
    def sample_call():
        with torch.no_grad():
            net(images, sigma, labels)
    return train_step, sample_call


def build_iddpm(row, device, tiny, batch):
    import torch
    from improved_diffusion.resample import UniformSampler
    from improved_diffusion.script_util import create_model_and_diffusion
    options = iddpm_options(row, *(['--num_channels', 32, '--num_res_blocks', 1] if tiny else []))
    model, diffusion = create_model_and_diffusion(**options)
    model.to(device).train()
    images = torch.randn(batch, 3, options['image_size'], options['image_size'], device=device)
    kwargs = dict(y=torch.arange(batch, device=device) % 10) if options['class_cond'] else {}
    schedule = UniformSampler(diffusion)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    torch.manual_seed(0)

    def train_step():
        t, weights = schedule.sample(batch, device)
        loss = (diffusion.training_losses(model, images, t, model_kwargs=kwargs)['loss'] * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t = torch.full((batch,), diffusion.num_timesteps // 2, device=device) # p_sample_loop: one step for the whole batch
    def sample_call():
        with torch.no_grad():
            diffusion.p_mean_variance(model, images, t, clip_denoised=True, model_kwargs=kwargs)
    return model, train_step, sample_call


def build_nano(row, device, tiny, batch):
    import torch
    import torch.nn.functional as F
    import nano_diffusion as nd
    from nano import adam
    flags = dict(zip(row.flags[::2], row.flags[1::2]))
    torch.manual_seed(0)
    network = nd.MyTinyUNet(cond=flags['--cond'], omega_init=flags.get('--omega-init', 'interp')).to(device)
    model = nd.DDPM(network, 1000, beta_start=0.0001, beta_end=0.02, device=torch.device(device))
    images = torch.randn(batch, 1, 32, 32, device=device)
    noise = torch.randn_like(images)
    optimizer = adam(network, 1e-3, device) # nano.py's

    def train_step(): # nano.py's training step
        t = torch.randint(0, model.num_timesteps, (batch,), device=device)
        loss = F.mse_loss(model.reverse(model.add_noise(images, noise, t), t), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t = torch.full((batch, 1), 500, dtype=torch.long, device=device) # the notebook's sampler: one step, shaped (N, 1)
    def sample_call():
        with torch.inference_mode():
            model.reverse(images, t)
    return network, train_step, sample_call


def build_edm2(row, device, tiny, batch):
    import torch
    import dnnlib
    from training.training_loop import EDM2Loss
    kwargs = edm2_network_kwargs(row)
    if tiny: # attention at 16x16 and 8x8 still: 32 channels a head
        kwargs.update(model_channels=32, channel_mult=[1,2,2], num_blocks=1, channels_per_head=32)
    net = dnnlib.util.construct_class_by_name(**kwargs).to(device).train()
    preset = edm2_preset(row) # the noise distribution as train_edm2.py sets it: the row's flags, else its preset's
    loss_fn = EDM2Loss(P_mean=float(flag_value(row.flags, '--P_mean', preset.P_mean)), P_std=float(flag_value(row.flags, '--P_std', preset.P_std)))
    resolution = row.recipe.resolution
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    labels = torch.eye(net.label_dim, device=device)[torch.arange(batch, device=device) % net.label_dim] if net.label_dim else None
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99)) # EDM2's optimizer
    return (net, *denoiser_calls(net, loss_fn, optimizer, images, labels))


BUILDERS = {'edm': ('edm', build_edm), 'iddpm': ('improved-diffusion', build_iddpm), 'dataflowr': ('dataflowr', build_nano),
            'edm2': ('edm2', build_edm2)}


def worker(conn, network, variant, device, tiny, threads):
    """One variant's process: build, then answer commands (time a block, set TF32, report memory) until 'stop'."""
    try:
        import torch
        torch.set_num_threads(threads)
        spec = NETWORKS[network]
        tree, build = BUILDERS[spec['upstream']]
        import_vendor_tree(tree, 'bench')
        settings = SETTINGS['tiny' if tiny else device][spec['upstream']]
        torch.manual_seed(0)
        net, train_step, sample_call = build(find(spec['upstream'], spec['dataset'], variant), device, tiny, settings['batch'])
        cuda = device == 'cuda'
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        conn.send(dict(parameters=sum(p.numel() for p in net.parameters()), batch=settings['batch']))
        peak = {'train': 0, 'sample': 0}
        while True:
            command, argument = conn.recv()
            if command == 'stop':
                break
            if command == 'tf32':
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = argument
                conn.send(None)
            elif command == 'time':
                call, calls = (train_step, settings['train_calls']) if argument == 'train' else (sample_call, settings['sample_calls'])
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    call()
                sync()
                seconds = (time.perf_counter() - start) / calls
                peak[argument] = max(peak[argument], torch.cuda.max_memory_allocated() if cuda else
                                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                conn.send(seconds)
            elif command == 'memory':
                conn.send(peak)
    except Exception:
        conn.send(dict(error=traceback.format_exc()))

#----------------------------------------------------------------------------
# The parent: start the workers, take turns, summarise.

class Failed(Exception):
    pass


def ask(conn, command, argument=None):
    conn.send((command, argument))
    answer = conn.recv()
    if isinstance(answer, dict) and 'error' in answer:
        raise Failed(answer['error'])
    return answer


def bench_network(network, device, modes, rounds, tiny, threads, log):
    """{mode: {variant: {'train': [s, ...], 'sample': [...], 'memory': {...}}}} plus parameters, for one network."""
    spec = NETWORKS[network]
    context = multiprocessing.get_context('spawn' if device == 'cuda' else 'fork') # CUDA cannot live in a forked process
    workers = {}
    try:
        for variant in spec['variants']:
            parent, child = context.Pipe()
            process = context.Process(target=worker, args=(child, network, variant, device, tiny, threads), daemon=True)
            process.start()
            workers[variant] = (process, parent)
            info = parent.recv()
            if 'error' in info:
                raise Failed(info['error'])
            workers[variant] += (info,)
        result = dict(title=spec['title'], batch=workers[spec['variants'][0]][2]['batch'],
                      parameters={v: workers[v][2]['parameters'] for v in spec['variants']}, modes={})
        for mode in modes:
            times = {v: {'train': [], 'sample': []} for v in spec['variants']}
            for variant in spec['variants']:
                ask(workers[variant][1], 'tf32', mode == 'tf32')
                if not tiny: # warm-up: allocator, cuDNN's algorithm search, first-call costs
                    for what in ['train', 'sample']:
                        ask(workers[variant][1], 'time', what)
            for round_ in range(rounds):
                for what in ['train', 'sample']:
                    for variant in spec['variants']:
                        times[variant][what].append(ask(workers[variant][1], 'time', what))
                log(f'  {network} {mode}: round {round_ + 1}/{rounds}')
            for variant in spec['variants']:
                times[variant]['memory'] = ask(workers[variant][1], 'memory')
            result['modes'][mode] = times
        return result
    finally:
        for process, conn, *_ in workers.values():
            try:
                conn.send(('stop', None))
            except OSError:
                pass
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def summarise(result, device_kind):
    """Lines of the table: per mode and variant, medians, spreads and ratios to the network's first variant."""
    lines = []
    network = result['network']
    variants = NETWORKS[network]['variants']
    for mode, times in result['modes'].items():
        base = times[variants[0]]
        for variant in variants:
            mine = times[variant]
            line = dict(network=network, title=result['title'], mode=mode, variant=variant, batch=result['batch'],
                        parameters=result['parameters'][variant], parameter_ratio=result['parameters'][variant] / result['parameters'][variants[0]])
            for what in ['train', 'sample']:
                ratios = [m / b for m, b in zip(mine[what], base[what])]
                line[f'{what}_ms'] = 1000 * statistics.median(mine[what])
                line[f'{what}_spread'] = (max(mine[what]) - min(mine[what])) / statistics.median(mine[what])
                line[f'{what}_ratio'] = statistics.median(ratios)
                line[f'{what}_ratio_range'] = [min(ratios), max(ratios)]
            peak, base_peak = max(mine['memory'].values()), max(base['memory'].values())
            line.update(memory_bytes=peak, memory_ratio=peak / base_peak if base_peak else None)
            for what in ['train', 'sample', 'memory']:
                target = TARGETS.get(device_kind, {}).get((network, variant, what))
                if target is not None:
                    line.setdefault('targets', {})[what] = dict(at_most=target, met=line[f'{what}_ratio'] <= target)
            lines.append(line)
    return lines


def markdown(lines, header):
    memory_name = 'peak alloc' if header['device'] == 'cuda' else 'peak RSS'
    out = [f'# Whole-network benchmark: {header["device_name"]}', '',
           f'{header["date"]}, commit {header["commit"]}, torch {header["torch"]}, {header["threads"]} CPU threads; '
           f'rounds: {", ".join(f"{n} {r}" for n, r in header["rounds"].items())}. Ratios: the median over rounds of variant / baseline within a round, [range]. '
           f'Targets (issue 11; EDM2 rows: issue 25) marked "ok" or "MISSED".', '',
           f'| network | mode | variant | batch | parameters | train step ms | train ratio | sampling eval ms | sampling ratio | {memory_name} MiB | memory ratio |',
           '|---|---|---|---|---|---|---|---|---|---|---|']

    def ratio(line, what):
        value = line[f'{what}_ratio']
        if value is None:
            return ''
        text = f'{value:.3f}'
        if what != 'memory':
            low, high = line[f'{what}_ratio_range']
            text += f' [{low:.3f}, {high:.3f}]'
        target = line.get('targets', {}).get(what)
        if target:
            text += f' (<= {target["at_most"]}: {"ok" if target["met"] else "MISSED"})'
        return text

    for line in lines:
        label = VARIANT_LABELS.get((NETWORKS[line['network']]['upstream'], line['variant']), line['variant'])
        out.append(f'| {line["title"]} | {line["mode"]} | {label} | {line["batch"]} | {line["parameters"]:,} ({line["parameter_ratio"]:.3f}) | '
                   f'{line["train_ms"]:.1f} ±{100 * line["train_spread"]:.0f}% | {ratio(line, "train")} | '
                   f'{line["sample_ms"]:.2f} ±{100 * line["sample_spread"]:.0f}% | {ratio(line, "sample")} | '
                   f'{line["memory_bytes"] / 2**20:,.0f} | {ratio(line, "memory")} |')
    out += ['', '"±" is the range of the timed blocks over their median. CPU memory is the whole process\'s peak resident set '
            '(Python and torch included), so its ratios understate the network\'s own share.']
    return '\n'.join(out) + '\n'


def device_name(device):
    import torch
    if device == 'cuda':
        return torch.cuda.get_device_name(0)
    return f'{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu', help='where the networks run')
    parser.add_argument('--networks', default=','.join(NETWORKS), help=f'comma-separated, from {", ".join(NETWORKS)}')
    parser.add_argument('--rounds', type=int, help='timed blocks of each variant (default: 7; nano diffusion on the CPU 21; tiny 1)')
    parser.add_argument('--tiny', action='store_true', help='tiny networks and batches, one round: checks the benchmark runs, measures nothing')
    # One thread: on a 2-core machine a second one gains about 12% and makes single timings vary by 13% instead of 3%.
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads of each worker')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results', 'bench'), help='folder of the JSON and markdown table')
    args = parser.parse_args()
    networks = [n for n in args.networks.split(',') if n]
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown or not networks:
        parser.error(f'unknown network {", ".join(unknown) or "(none)"}; choose from {", ".join(NETWORKS)}')
    if args.rounds is not None and args.rounds < 1 or args.threads < 1:
        parser.error('--rounds and --threads must be at least 1')
    import torch
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device visible to torch here')
    kind = 'tiny' if args.tiny else args.device
    rounds = {network: args.rounds or SETTINGS[kind][NETWORKS[network]['upstream']]['rounds'] for network in networks}
    modes = ['fp32', 'tf32'] if args.device == 'cuda' else ['fp32']
    # A copy of the tree without its .git (a GPU machine's) names its commit in BENCH_COMMIT.
    commit = os.environ.get('BENCH_COMMIT') or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                                              text=True).stdout.strip() or 'unknown'
    header = dict(device=args.device, device_name=device_name(args.device), date=datetime.date.today().isoformat(), commit=commit,
                  torch=torch.__version__, threads=args.threads, rounds=rounds, tiny=args.tiny)
    log = lambda text: print(text, flush=True)
    log(f'benchmark on {header["device_name"]}: {", ".join(f"{n} ({r} rounds)" for n, r in rounds.items())}; modes {", ".join(modes)}')
    lines, failures = [], []
    for network in networks:
        start = time.time()
        try:
            result = bench_network(network, args.device, modes, rounds[network], args.tiny, args.threads, log)
        except Failed as err:
            failures.append(network)
            log(f'{network}: failed:\n{err}')
            continue
        result['network'] = network
        lines += summarise(result, kind)
        log(f'{network}: {time.time() - start:.0f} s')
    os.makedirs(args.out, exist_ok=True)
    name = 'tiny' if args.tiny else args.device if args.device == 'cpu' else header['device_name'].lower().replace(' ', '-')
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
        json.dump(dict(header, lines=lines, failed=failures), f, indent=1)
    table = markdown(lines, header)
    with open(os.path.join(args.out, f'{name}.md'), 'w') as f:
        f.write(table)
    print(table)
    print(f'written to {args.out}/{name}.md and {name}.json')
    missed = [f'{l["network"]} {l["variant"]} {l["mode"]} {w}' for l in lines for w, t in l.get('targets', {}).items() if not t['met']]
    if missed:
        print('targets missed: ' + '; '.join(missed))
    if failures:
        sys.exit(f'bench: {", ".join(failures)} failed (see above)')


if __name__ == '__main__':
    with interruptible('make bench', resumes=False): # Ctrl-C: one line, no traceback
        main()
