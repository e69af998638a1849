"""Nano diffusion's LoRA layers one by one: the per-sample paths timed against the cost model's choice.

    python -m tools.bench.layers            # batch 128, 10 timed alternations (make bench-layers)

In training each sample has its own composition weights, and a LoRA layer either merges each sample's
update into its own kernel (a grouped convolution) or runs the low-rank path; per_sample_merge_pays()
chooses by weighted multiply-adds (overlay/common/lora.py). For each distinct layer shape of MyTinyUNet
(UC-LoRA, the notebook's 32x32 digits), this times forward + backward of the base convolution alone and
of both paths, alternated in one process, and says whether the model picks the faster path. Writes
<out>/layers-cpu.md.
"""

import argparse
import os
import statistics
import time

from tools.vendoring.run import interruptible
from tools.vendoring.upstream import ROOT, import_vendor_tree


def layer_shapes(unet, batch):
    """{(C_in, C_out, size): a LoRA layer of that shape} for MyTinyUNet's LoRA layers, in network order."""
    import torch
    import nano_lora
    shapes, hooks = {}, []
    for layer in nano_lora.lora_layers(unet):
        def record(module, args, layer=layer):
            x = args[0]
            shapes.setdefault((x.shape[1], layer.weight.shape[0], x.shape[-1]), layer)
        hooks.append(layer.register_forward_pre_hook(record))
    with torch.no_grad():
        unet(torch.zeros(batch, 1, 32, 32), torch.zeros(batch, dtype=torch.long))
    for hook in hooks:
        hook.remove()
    return shapes


def time_paths(layer, batch, size, repeats):
    """Median ms of forward + backward: base convolution, per-sample merged path, low-rank path."""
    import torch
    x = torch.randn(batch, layer.weight.shape[1], size, size, requires_grad=True)
    weights = torch.randn(batch, layer.bases, requires_grad=True)
    grad = torch.randn(batch, layer.weight.shape[0], size, size)
    paths = {'base': lambda: layer.base_forward(x), 'merged': lambda: layer.per_sample_merged_forward(x, weights),
             'low-rank': lambda: layer.low_rank_forward(x, weights)}
    times = {name: [] for name in paths}
    for index in range(repeats + 2): # the first two rounds warm up
        for name, path in paths.items():
            start = time.perf_counter()
            path().backward(grad)
            if index >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=128, help='samples a batch (nano.py trains with 128)')
    parser.add_argument('--repeats', type=int, default=10, help='timed alternations of the three computations')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (make bench times with one)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results', 'bench'), help='folder of layers-cpu.md')
    args = parser.parse_args()
    if min(args.batch, args.repeats, args.threads) < 1:
        parser.error('--batch, --repeats and --threads must be at least 1')
    import torch
    torch.set_num_threads(args.threads)
    import_vendor_tree('dataflowr', 'bench.layers')
    import nano_diffusion
    torch.manual_seed(0)
    unet = nano_diffusion.MyTinyUNet(cond='uclora')
    lines = ['| C_in -> C_out | size | base ms | merged ms | low-rank ms | faster | cost model picks |', '|---|---|---|---|---|---|---|']
    wrong = 0
    for (c_in, c_out, size), layer in layer_shapes(unet, 2).items():
        with torch.no_grad():
            layer.lora_B.normal_() # away from the zero init (the times do not depend on it)
        ms = time_paths(layer, args.batch, size, args.repeats)
        faster = 'merged' if ms['merged'] < ms['low-rank'] else 'low-rank'
        picked = 'merged' if layer.per_sample_merge_pays(torch.zeros(1, c_in, size, size)) else 'low-rank'
        wrong += faster != picked
        lines.append(f'| {c_in} -> {c_out} | {size}x{size} | {ms["base"]:.1f} | {ms["merged"]:.1f} | {ms["low-rank"]:.1f} | {faster} | '
                     f'{picked}{"" if faster == picked else " (slower)"} |')
        print(lines[-1], flush=True)
    summary = f'The cost model picks the faster path for {len(lines) - 2 - wrong} of {len(lines) - 2} layer shapes.'
    header = (f'# Nano diffusion LoRA layers, forward + backward (make bench-layers)\n\nUC-LoRA, batch {args.batch}, '
              f'{args.threads} torch thread(s), median of {args.repeats} alternations; torch {torch.__version__}.\n\n')
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'layers-cpu.md'), 'w') as f:
        f.write(header + '\n'.join(lines) + '\n\n' + summary + '\n')
    print(summary)
    print(f'written to {os.path.join(args.out, "layers-cpu.md")}')


if __name__ == '__main__':
    with interruptible('make bench-layers', resumes=False): # Ctrl-C: one line, no traceback
        main()
