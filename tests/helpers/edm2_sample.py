"""Run inside an EDM2 tree (pristine or patched): load a snapshot as EDM2's generate_images.py does and sample from it
with its own edm_sampler on the CPU (its main() needs CUDA).

    python edm2_sample.py SNAPSHOT OUT

OUT holds the names and values of the network's parameters and the images drawn from fixed noise and labels.
"""

import pickle
import sys

import torch

from generate_images import edm_sampler

snapshot, out = sys.argv[1:]
with open(snapshot, 'rb') as f:
    net = pickle.load(f)['ema']
noise = torch.randn([4, net.img_channels, net.img_resolution, net.img_resolution], generator=torch.Generator().manual_seed(5))
labels = torch.eye(net.label_dim)[[0, 1, 2, 3]] if net.label_dim else None
with torch.no_grad():
    images = edm_sampler(net, noise, labels, num_steps=4)
torch.save(dict(state=net.state_dict(), images=images), out)
