"""improved-diffusion glue: TimeLoRA and ClassLoRA on the attention layers of UNetModel.

Paper Section 3 and Appendix A.2, A.4. The flags enter through model_and_diffusion_defaults(), so
scripts/image_train.py and scripts/image_sample.py both accept them (see patches/iddpm). UNetModel
calls add_lora() at the end of its constructor, after the base network has drawn all its random
numbers, and condition() once per forward pass.
"""

import torch as th
import torch.nn.functional as F

from .lora import TABLE_INITS, TimeClassLoRAConv, one_condition_if_shared

# Flags added to model_and_diffusion_defaults(); the defaults build the upstream network.
LORA_DEFAULTS = dict(
    time_lora=False,            # TimeLoRA on qkv and proj_out of every AttentionBlock.
    class_lora=False,           # ClassLoRA (one basis per class) on the same layers; needs --class_cond.
    lora_rank=4,                # Rank of each basis.
    lora_bases=11,              # TimeLoRA bases, equally spaced from t = 0 to T - 1.
    lora_table_init="interp",   # TimeLoRA composition table at init: "interp" or "random".
    lora_compositional=True,    # False: one TimeLoRA per time step, no table (Section 3.1's first variant).
    conv_cond=True,             # False: no time embedding, no label embedding, no ResBlock.emb_layers.
)
ADAPTED_LAYERS = ["qkv", "proj_out"]  # The 1x1 (Conv1d) layers of each AttentionBlock.


def check_options(time_lora, class_lora, lora_rank, lora_bases, lora_table_init, lora_compositional, conv_cond, class_cond, num_classes, diffusion_steps):
    """Raise ValueError with a message a user can act on, for a bad combination of flags."""
    if lora_rank < 1 or lora_bases < 1 or num_classes < 1:
        raise ValueError(f"--lora_rank, --lora_bases and --num_classes must be at least 1 (got {lora_rank}, {lora_bases}, {num_classes})")
    if lora_table_init not in TABLE_INITS:
        raise ValueError(f'--lora_table_init must be one of {", ".join(TABLE_INITS)} (got "{lora_table_init}")')
    if time_lora and lora_compositional and lora_bases > diffusion_steps:
        raise ValueError(f"--lora_bases {lora_bases} exceeds --diffusion_steps {diffusion_steps}")
    if class_lora and not class_cond:
        raise ValueError("--class_lora True needs --class_cond True (and class labels in the data)")
    if not conv_cond and not time_lora:
        raise ValueError("--conv_cond False needs --time_lora True: nothing else would carry the time step")
    if not conv_cond and class_cond and not class_lora:
        raise ValueError("--conv_cond False with --class_cond True needs --class_lora True: nothing else would carry the class")


def check_args(parser, args):
    """check_options() for parsed script arguments, as argparse errors."""
    try:
        check_options(**{key: getattr(args, key) for key in LORA_DEFAULTS}, class_cond=args.class_cond,
                      num_classes=args.num_classes, diffusion_steps=args.diffusion_steps)
    except ValueError as err:
        parser.error(str(err))


def add_lora(unet, diffusion_steps=None, rescale_timesteps=True, **options):
    """Adapt `unet` in place for `options` (keys of LORA_DEFAULTS); return what condition() needs,
    or None without LoRA. diffusion_steps and rescale_timesteps are GaussianDiffusion's."""
    unknown = set(options) - set(LORA_DEFAULTS)
    if unknown:
        raise TypeError(f'unknown LoRA options: {", ".join(sorted(unknown))}')
    options = dict(LORA_DEFAULTS, **options)
    if options["time_lora"] and diffusion_steps is None:
        raise ValueError("TimeLoRA needs diffusion_steps, the number of rows of its table")
    class_cond = unet.num_classes is not None
    check_options(**options, class_cond=class_cond, num_classes=unet.num_classes or 1,
                  diffusion_steps=diffusion_steps or options["lora_bases"])

    if not options["conv_cond"]:
        unet.time_embed = None
        if class_cond:
            unet.label_emb = None
        for block in unet.modules():
            if hasattr(block, "emb_layers"):
                block.emb_layers = None
    if not (options["time_lora"] or options["class_lora"]):
        return None

    time_bases = options["lora_bases"] if options["time_lora"] else 0
    num_classes = unet.num_classes if options["class_lora"] else 0
    for block in unet.modules():
        if all(hasattr(block, name) for name in ADAPTED_LAYERS):
            for name in ADAPTED_LAYERS:
                layer = IDDPMLoRAConv.from_base(getattr(block, name), rank=options["lora_rank"], time_steps=diffusion_steps or 1,
                    time_bases=time_bases, num_classes=num_classes, table_init=options["lora_table_init"],
                    compositional=options["lora_compositional"])
                setattr(block, name, layer)
    return dict(steps=diffusion_steps, rescaled=rescale_timesteps, num_classes=num_classes)


def condition(lora, timesteps, y):
    """The attention layers' condition for one batch: [N, 1 + K] float ([1, 1 + K] on the CPU when every sample
    has the same one), or None without LoRA.

    Column 0 is the original integer time step. GaussianDiffusion hands the model t * 1000 / T
    when rescale_timesteps=True, and SpacedDiffusion has already mapped respaced steps back to the
    original ones, so rounding recovers the exact step. It travels as float: IDDPM's checkpoint()
    makes every input require grad, which integer tensors cannot. Columns 1..K: the one-hot class.
    """
    if lora is None:
        return None
    steps = timesteps.double() * lora["steps"] / 1000 if lora["rescaled"] else timesteps.double()
    steps = steps.round()
    message = f'time steps must lie in [0, {lora["steps"] - 1}] (--diffusion_steps {lora["steps"]})'
    in_range = ((steps >= 0) & (steps <= lora["steps"] - 1)).all()
    if steps.device.type == "cpu":
        if not in_range:
            raise ValueError(f"{message}; got {steps.min():g}..{steps.max():g}")
    else: # checked on the device: reading the answer back would stall the GPU at every forward pass
        th._assert_async(in_range, message)
    columns = [steps.float()[:, None]]
    if lora["num_classes"]:
        columns.append(F.one_hot(y, lora["num_classes"]).float())
    return one_condition_if_shared(th.cat(columns, dim=1)) # the samplers' one step (and class) for the batch: one row


class IDDPMLoRAConv(TimeClassLoRAConv):
    """TimeClassLoRAConv taking the packed condition of condition() as one tensor."""

    def forward(self, x, cond):
        return super().forward(x, cond[:, 0].long(), cond[:, 1:])
