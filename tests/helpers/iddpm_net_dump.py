"""Run inside an improved-diffusion tree (pristine or patched): build models, evaluate each once, save them all.

    python iddpm_net_dump.py '{"<tag>": <flags>, ...}' SEED OUT_DIR

Flags are image_train.py's; those the tree does not know (the pristine tree has no LoRA flags) are
an error, so a comparison cannot silently drop one. Each model is built from the same seed and
written to OUT_DIR/<tag>.pt.
"""

import json
import os
import sys

import torch

from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

configs, seed, out_dir = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
defaults = model_and_diffusion_defaults()
for tag, flags in configs.items():
    unknown = set(flags) - set(defaults)
    assert not unknown, f'flags unknown to this tree: {unknown}'
    torch.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**dict(defaults, **flags))
    model.eval()

    inputs = torch.Generator().manual_seed(1234)
    size = defaults['image_size'] if 'image_size' not in flags else flags['image_size']
    x = torch.randn([3, 3, size, size], generator=inputs)
    t = torch.tensor([0, 17, diffusion.num_timesteps - 1])
    kwargs = dict(y=torch.tensor([0, 5, 9])) if flags.get('class_cond') else {}
    with torch.no_grad(): # as GaussianDiffusion calls it: through SpacedDiffusion's wrapper, which rescales t
        output = diffusion._wrap_model(model)(x, t, **kwargs)
    torch.save(dict(names=[name for name, _ in model.named_parameters()], state=model.state_dict(), output=output),
               os.path.join(out_dir, f'{tag}.pt'))
