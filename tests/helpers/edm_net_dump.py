"""Run inside an EDM tree (pristine or patched): build networks, evaluate each once, save them all.

    python edm_net_dump.py '{"<tag>": <network kwargs>, ...}' SEED OUT_DIR

Each network is built from the same seed and written to OUT_DIR/<tag>.pt, one process for all of
them (imports and start-up are paid once).
"""

import json
import os
import sys

import torch

import dnnlib

configs, seed, out_dir = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for tag, kwargs in configs.items():
    torch.manual_seed(seed)
    net = dnnlib.util.construct_class_by_name(**kwargs).eval()

    inputs = torch.Generator().manual_seed(1234)
    x = torch.randn([3, net.img_channels, net.img_resolution, net.img_resolution], generator=inputs)
    sigma = torch.tensor([0.05, 1.0, 40.0])
    labels = torch.eye(net.label_dim)[[0, 1, 2]] if net.label_dim else None
    augment = torch.randn([3, 9], generator=inputs) if kwargs.get('augment_dim') else None
    extra = dict(augment_labels=augment) if augment is not None else {}
    with torch.no_grad():
        output = net(x, sigma, labels, **extra)
        # EDM's samplers pass one noise level for the whole batch: the condition embedding then has batch size 1.
        output_one_sigma = net(x, sigma[1], labels, **extra)
    torch.save(dict(names=[name for name, _ in net.named_parameters()], state=net.state_dict(), output=output, output_one_sigma=output_one_sigma),
               os.path.join(out_dir, f'{tag}.pt'))
