"""CPU micro-benchmark: one DDPM++ attention UNetBlock with UC-LoRA against the same block without.

    python -m tools.bench.edm_attention [--batch 16] [--repeats 10] [--threads 2]

Both blocks have the CIFAR-10 shape of the paper's rows (256 channels at 16x16, embedding 512,
18 bases of rank 4, MLP 128,64) and the same base weights; each timing is forward + backward, the
median over --repeats runs after a warm-up, measured alternately in one process.
"""

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from tools.vendoring.upstream import import_vendor_tree


def attention_block():
    from training.networks import UNetBlock
    init = dict(init_mode='xavier_uniform')
    return UNetBlock(in_channels=256, out_channels=256, emb_channels=512, attention=True, num_heads=1, dropout=0.13,
        skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=[1,1], resample_proj=True, adaptive_scale=False, init=init,
        init_zero=dict(init_mode='xavier_uniform', init_weight=1e-5), init_attn=dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2)))


def time_step(block, x, emb):
    start = time.perf_counter()
    block(x, emb).square().mean().backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=16, help='images per step')
    parser.add_argument('--repeats', type=int, default=10, help='timed steps per block')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    args = parser.parse_args()
    if min(args.batch, args.repeats, args.threads) < 1:
        parser.error('--batch, --repeats and --threads must be at least 1')
    import_vendor_tree('edm', 'bench')
    from training import lora_edm
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    baseline = attention_block().train()
    lora = torch.nn.ModuleDict({'block': copy.deepcopy(baseline)})
    lora_edm.condition_attention(lora, lora='uc', lora_rank=4, lora_bases=18, lora_mlp=[128, 64])
    lora = lora['block'].train()
    x = torch.randn(args.batch, 256, 16, 16)
    emb = torch.randn(args.batch, 512)

    times = {'baseline': [], 'uc-lora': []}
    for _ in range(2): # warm-up
        time_step(baseline, x, emb), time_step(lora, x, emb)
    for _ in range(args.repeats): # alternate, so that drifts in machine load hit both alike
        times['baseline'].append(time_step(baseline, x, emb))
        times['uc-lora'].append(time_step(lora, x, emb))

    count = lambda m: sum(p.numel() for p in m.parameters())
    base_ms, lora_ms = (1000 * statistics.median(times[k]) for k in ['baseline', 'uc-lora'])
    print(f'DDPM++ attention UNetBlock, 256 ch at 16x16, batch {args.batch}, {args.threads} CPU threads, forward + backward, median of {args.repeats}')
    print(f'  baseline  {base_ms:8.1f} ms   {count(baseline):9,d} parameters')
    print(f'  UC-LoRA   {lora_ms:8.1f} ms   {count(lora):9,d} parameters (18 bases, rank 4, MLP 128,64)')
    print(f'  ratio     {lora_ms / base_ms:8.3f}')


if __name__ == '__main__':
    main()
