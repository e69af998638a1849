"""Run inside an EDM2 tree (pristine or patched): build networks, evaluate each, save them all.

    python edm2_net_dump.py '{"<tag>": <network kwargs>, ...}' SEED OUT_DIR

Each network is built from the same seed and written to OUT_DIR/<tag>.pt: its parameter names and state dict as
built, and its outputs (with its output gain opened) in evaluation and in training mode, one process for all of them
(imports and start-up are paid once).
"""

import json
import os
import sys

import torch

import dnnlib

configs, seed, out_dir = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for tag, kwargs in configs.items():
    torch.manual_seed(seed)
    net = dnnlib.util.construct_class_by_name(**kwargs)
    names = [name for name, _ in net.named_parameters()]
    state = {name: value.clone() for name, value in net.state_dict().items()} # training mode renormalises weights in place
    with torch.no_grad():
        # EDM2's U-Net starts with out_gain = 0: its output is zero, whatever its blocks compute, until the first step
        # opens it. Opened here, so that the outputs show what the blocks compute.
        net.unet.out_gain.fill_(1)

    inputs = torch.Generator().manual_seed(1234)
    x = torch.randn([3, net.img_channels, net.img_resolution, net.img_resolution], generator=inputs)
    sigma = torch.tensor([0.05, 1.0, 40.0])
    labels = torch.eye(net.label_dim)[[0, 1, 2]] if net.label_dim else None
    with torch.no_grad():
        output = net.eval()(x, sigma, labels)
        # EDM2's sampler passes one noise level for the whole batch: the embedding then has batch size 1.
        output_one_sigma = net(x, sigma[1], labels)
        output_train, output_logvar = net.train()(x, sigma, labels, return_logvar=True)
    torch.save(dict(names=names, state=state, output=output, output_one_sigma=output_one_sigma, output_train=output_train,
                    output_logvar=output_logvar), os.path.join(out_dir, f'{tag}.pt'))
