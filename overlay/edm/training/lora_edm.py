"""EDM glue: UC-LoRA on the attention layers of SongUNet (DDPM++, NCSN++) and DhariwalUNet (ADM).

Called once at the end of the U-Net's constructor (see patches/edm), after the base network has
drawn all its random numbers, so the base weights are the same as without LoRA for the same seed.
Only the layer objects in the network are pickled; this module is not needed to load a snapshot.
"""

from training.lora import UCLoRAConv

LORA_MODES = ['none', 'uc']
ADAPTED_LAYERS = ['qkv', 'proj'] # The 1x1 convolutions of each attention UNetBlock.

def add_lora(unet, mode, rank, bases, mlp_widths):
    """Condition every attention UNetBlock of `unet` with `mode` ('uc': UC-LoRA)."""
    if mode not in LORA_MODES:
        raise ValueError(f'unknown LoRA mode "{mode}" (choose from {", ".join(LORA_MODES)})')
    if mode == 'none':
        return
    blocks = [block for block in unet.modules() if getattr(block, 'num_heads', 0)]
    if not blocks:
        raise ValueError(f'{type(unet).__name__} has no attention layers for LoRA to condition')
    for block in blocks:
        for name in ADAPTED_LAYERS:
            base = getattr(block, name)
            lora = UCLoRAConv(in_channels=base.in_channels, out_channels=base.out_channels, kernel=base.weight.shape[-1], num_dims=2,
                bases=bases, rank=rank, emb_channels=block.emb_channels, mlp_widths=mlp_widths, base_bias=base.bias is not None)
            setattr(block, name, lora.adopt_base(base))
        block.attn_lora = True # UNetBlock.forward now passes emb to qkv and proj.
