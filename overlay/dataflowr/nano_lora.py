"""Nano diffusion glue: TimeLoRA or UC-LoRA on the convolutions of MyTinyUNet's blocks.

Paper Section 5.2, Fig. 3 and 4, Appendix A.1, A.5. Nano diffusion has no attention layers, so the
LoRA goes on the 3x3 convolution of every MyConv in the blocks b1, b2, b3, b_mid, b4, b5, b_out (not
on the down/up-sampling convolutions, nor on conv_out): A is a 3x3 convolution to m*r channels, B
a 1x1 convolution back. Conditioning modes (MyTinyUNet's `cond`):

    shift     the notebook's own: a time embedding added to each block's input (no LoRA)
    timelora  compositional TimeLoRA, the time-embedding additions removed; the composition
              table starts as the two-nearest-basis interpolation (omega_init='interp') or N(0, 1)
    uclora    UC-LoRA: composition weights from an MLP on the sinusoidal time embedding;
              the time-embedding additions removed

Defaults: 10 bases, so that with T = 1000 they sit exactly at t = 0, 111, ..., 999 ((m - 1) divides
T - 1 = 999), rank 4, MLP widths 64, 32 (the paper leaves its nano-diffusion sizes open).
"""

from lora import TABLE_INITS, TimeClassLoRAConv, UCLoRAConv, omega_together, one_condition_if_shared

CONDITIONING = ['shift', 'timelora', 'uclora']
OMEGA_INITS = TABLE_INITS # the paper's omega: TimeLoRA's composition table
BLOCKS = ['b1', 'b2', 'b3', 'b_mid', 'b4', 'b5', 'b_out']
TIME_EMBEDDING_ADDITIONS = ['te1', 'te2', 'te3', 'te_mid', 'te4', 'te5', 'te_out']


def add_lora(unet, cond, n_steps, time_emb_dim, lora_bases=10, lora_rank=4, omega_init='interp', lora_mlp=(64, 32)):
    """Condition `unet` (a MyTinyUNet) as `cond` says; called at the end of its constructor."""
    if cond not in CONDITIONING:
        raise ValueError(f'unknown conditioning "{cond}" (choose from {", ".join(CONDITIONING)})')
    if omega_init not in OMEGA_INITS:
        raise ValueError(f'unknown omega init "{omega_init}" (choose from {", ".join(OMEGA_INITS)})')
    unet.cond = cond
    if cond == 'shift':
        return
    for name in TIME_EMBEDDING_ADDITIONS:
        setattr(unet, name, None)
    for block in BLOCKS:
        for layer in getattr(unet, block):
            if cond == 'timelora':
                layer.conv1 = TimeClassLoRAConv.from_base(layer.conv1, rank=lora_rank, time_steps=n_steps, time_bases=lora_bases,
                    num_classes=0, table_init=omega_init)
            else:
                layer.conv1 = UCLoRAConv.from_base(layer.conv1, rank=lora_rank, bases=lora_bases, emb_channels=time_emb_dim,
                    mlp_widths=list(lora_mlp))


def condition(unet, t):
    """What the LoRA layers take for time steps t ([N] or the sampler's [N, 1]); None for 'shift'.

    The sampler gives every sample the same step: then one step stands for the batch (on the CPU,
    lora.one_condition_if_shared), and each LoRA layer merges its update into its weight once."""
    if unet.cond == 'shift':
        return None
    t = one_condition_if_shared(t.reshape(-1))
    if unet.cond == 'timelora':
        return t
    # UC-LoRA: every layer's MLP reads the same embedding, so all of them run as one batched MLP.
    return omega_together(lora_layers(unet), unet.time_embed(t))


def lora_layers(unet):
    """The LoRA layers, in the order of the blocks."""
    return [layer.conv1 for name in BLOCKS for layer in getattr(unet, name)]


def shifted(x, time_embedding_addition, t):
    """A block's input x shifted by its time-embedding addition (the notebook's conditioning), or x itself where
    LoRA conditions instead: adding a zero would cost a pass over the activations for nothing."""
    if time_embedding_addition is None:
        return x
    return x + time_embedding_addition(t).reshape(len(x), -1, 1, 1)


def block(layers, x, cond):
    """Run a block's MyConv layers, handing each the LoRA condition (if any)."""
    for layer in layers:
        x = layer(x) if cond is None else layer(x, cond)
    return x


def composition_weights(unet, t):
    """Each LoRA layer's composition weights omega at time steps t, [N, m] a layer (for the Fig. 4 heatmaps)."""
    cond = condition(unet, t)
    return [lora.lora_table(cond) if unet.cond == 'timelora' else cond[lora] for lora in lora_layers(unet)]
