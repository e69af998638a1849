"""EDM glue: UC-LoRA on the attention layers of SongUNet (DDPM++, NCSN++) and DhariwalUNet (ADM).

The U-Nets pass their LoRA keyword arguments here, at the end of their constructor (see
patches/edm), after the base network has drawn all its random numbers: the base weights are the
same as without LoRA for the same seed. Only the layer objects end up in the network and its
pickles; this module is not needed to load a snapshot.
"""

from training.lora import UCLoRAConv

LORA_MODES = ['none', 'uc']
LORA_SCALES = ['fixed', 'trainable']
ADAPTED_LAYERS = ['qkv', 'proj'] # The 1x1 convolutions of each attention UNetBlock.

def add_lora(unet,
    lora        = 'none',       # Attention conditioning: 'none' or 'uc' (UC-LoRA, paper Section 4.1).
    lora_rank   = 4,            # Rank of each LoRA basis.
    lora_bases  = 18,           # Number of LoRA bases per adapted layer.
    lora_mlp    = [128,64],     # Hidden widths of each composition-weight MLP (paper Appendix A.5).
    lora_bias   = True,         # Per-basis bias term of the authors' release (counted in the paper's Table 1).
    lora_scale  = 'fixed',      # Scale of the LoRA update: 'fixed' (1, the paper's text) or 'trainable' (a scalar
                                # per adapted layer, initialised to 1: the paper's FFHQ count has one, see tools/paper/rows.py).
):
    if lora not in LORA_MODES:
        raise ValueError(f'unknown LoRA mode "{lora}" (choose from {", ".join(LORA_MODES)})')
    if lora_scale not in LORA_SCALES:
        raise ValueError(f'unknown LoRA scale "{lora_scale}" (choose from {", ".join(LORA_SCALES)})')
    if lora == 'none':
        return
    blocks = [block for block in unet.modules() if getattr(block, 'num_heads', 0)]
    if not blocks:
        raise ValueError(f'{type(unet).__name__} has no attention layers for LoRA to condition')
    for block in blocks:
        for name in ADAPTED_LAYERS:
            base = getattr(block, name)
            layer = UCLoRAConv(in_channels=base.in_channels, out_channels=base.out_channels, kernel=base.weight.shape[-1], num_dims=2,
                bases=lora_bases, rank=lora_rank, emb_channels=block.emb_channels, mlp_widths=lora_mlp, base_bias=base.bias is not None, lora_bias=lora_bias,
                trainable_scale=(lora_scale == 'trainable'))
            setattr(block, name, layer.adopt_base(base))
        block.attn_lora = True # UNetBlock.forward now passes emb to qkv and proj.
