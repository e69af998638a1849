"""Run inside an EDM tree: load a snapshot (.pkl) or training state (.pt) and save plain tensors.

    python edm_load.py network-snapshot-*.pkl OUT.pt [--sample]   # ema state dict (+ samples)
    python edm_load.py training-state-*.pt OUT.pt                 # net state dict + optimizer state

--sample draws 4 images with this tree's generate.edm_sampler (4 steps, fixed latents) on the CPU.
Run with only the pristine tree on sys.path, this is what a user of upstream EDM can do with a file.
"""

import pickle
import sys

import torch

path, out = sys.argv[1], sys.argv[2]
result = {}
if path.endswith('.pkl'):
    with open(path, 'rb') as f:
        net = pickle.load(f)['ema']
    result['ema'] = net.state_dict()
    if '--sample' in sys.argv:
        from generate import edm_sampler
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn([4, net.img_channels, net.img_resolution, net.img_resolution], generator=generator)
        labels = torch.eye(net.label_dim)[[0, 1, 2, 3]] if net.label_dim else None
        noise = lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype)
        with torch.no_grad():
            result['samples'] = edm_sampler(net, latents, labels, num_steps=4, randn_like=noise)
else:
    data = torch.load(path, map_location='cpu', weights_only=False)
    result['net'] = data['net'].state_dict()
    result['optimizer'] = data['optimizer_state']
torch.save(result, out)
