"""UC-LoRA (paper Section 4.1) on the attention of EDM2's U-Net, in EDM2's magnitude-preserving form.

EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models") keeps every
activation at unit magnitude and force-normalises every weight, and its presets train at learning rates of
0.01 and more that rely on it. A plain LoRA (B starting at zero, no normalisation) at such a rate grows by about
the learning rate a step, against base weights of about 1/sqrt(C) an element, and breaks those invariants. So
each part of the LoRA term here is an EDM2 layer. For attn_qkv or attn_proj of an attention Block, with input x
[N, C_in, H, W], the embedding emb [N, C_emb] that the Block's residual branch reads, m bases of rank r:

    y     = base(x)                                  the MPConv itself, untouched: its output is the baseline's
    omega = MLP(emb)                                 [N, m]: MPConv-style linear layers, no biases, mp_silu between
    delta = 1/sqrt(m) sum_i omega_i B_i' A_i' x      A_i' [r, C_in]: A_i with each row normalised, / sqrt(C_in);
                                                     B_i' [C_out, r]: B_i with each row normalised, / sqrt(r)
    out   = (y + g delta) / sqrt(1 + g^2)            g: a learned scalar gain, zero at initialisation

- A_i' and B_i' are scaled as MPConv scales its weight (unit-norm rows): A_i' x has unit magnitude where x
  has, and so has B_i' (A_i' x). Training normalises A and B in place at every forward pass (forced weight
  normalisation, EDM2's Equation 66) and again differentiably, as MPConv does, so that Adam's steps of about
  the learning rate turn them rather than grow them.
- omega comes from unit-magnitude emb through normalised layers: about unit magnitude. A sum of m unit terms
  with unit weights has magnitude sqrt(m), hence 1/sqrt(m), as MPConv divides by the square root of its fan-in.
- g = 0 gives out = y exactly: the network starts as the baseline (EDM2's own pattern: emb_gain, out_gain).
  Dividing by sqrt(1 + g^2) keeps out at unit magnitude whatever g grows to (for delta uncorrelated with y, as
  EDM2's mp_sum assumes; for g >= 0 it is mp_sum(y, delta, t) with t = g / (1 + g)). Without it out grows as
  sqrt(1 + g^2): no matter for attn_qkv, whose q, k and v are pixel-normalised, but attn_proj's output enters
  mp_sum(x, y, attn_balance), which assumes unit magnitude.
- No bias terms (the paper's per-basis E of the authors' EDM release): EDM2 has no biases anywhere.

The LoRA layer sits beside its base, as Block.attn_qkv_lora and Block.attn_proj_lora (patches/edm2): the base
MPConv stays the very module it was, under its own name, so a network without LoRA is pristine EDM2's and the
base output is EDM2's to the bit. condition_attention() adds the layers at the end of Precond's constructor,
after the base network has drawn all its random numbers (its weights are the baseline's for the same seed);
with conv_cond=False ("only LoRA", paper Section 5.3) it also removes every Block's emb_linear and emb_gain, so
that the embedding reaches the network through the LoRA layers only.

This file imports only torch, numpy and EDM2's torch_utils: EDM2 pickles embed the source of each persistent
class's module and re-run it when loading, so it must run beside a pristine EDM2 tree, and everything a LoRA
layer runs stays in this one file.
"""

import numpy as np
import torch
from torch_utils import persistence

LORA_MODES = ['none', 'uc']
ADAPTED_LAYERS = ['attn_qkv', 'attn_proj'] # The 1x1 MPConvs of each attention Block.

#----------------------------------------------------------------------------
# EDM2's magnitude-preserving operations, as the LoRA layers use them.

def normalize(x, dim, eps=1e-4):
    """x scaled to unit RMS along dim (x / (eps + RMS)), as EDM2 normalises its weights and pixels."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    rms = norm / np.sqrt(x.numel() // norm.numel())
    return x / (eps + rms).to(x.dtype)


def mp_silu(x):
    # SiLU divided by its output RMS for unit-normal inputs (EDM2's Equation 81).
    return torch.nn.functional.silu(x) / 0.596


def mp_weight(weight, dim, training):
    """weight as MPConv uses its own, in float32: in training first normalised in place (forced weight normalisation),
    then normalised differentiably, and divided by the square root of the fan-in (the size along dim), so that
    every row along dim has unit norm."""
    w = weight.to(torch.float32)
    if training:
        with torch.no_grad():
            weight.copy_(normalize(w, dim))
    return normalize(w, dim) / np.sqrt(w.shape[dim])

#----------------------------------------------------------------------------
# The composition MLP (paper Appendix A.5) in EDM2's form: MPConv-style linear layers, no biases, mp_silu
# between, in place of the paper's Linear, GroupNorm and SiLU (EDM2 normalises weights rather than activations).

@persistence.persistent_class
class MPLinear(torch.nn.Module):
    """A fully-connected layer as EDM2's MPConv with a 2-D weight. [weight] [out_features, in_features].
    forward(x): x [N, in_features] -> [N, out_features]."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))

    def forward(self, x):
        return x @ mp_weight(self.weight, dim=1, training=self.training).to(x.dtype).t()


@persistence.persistent_class
class CompositionMLP(torch.nn.Module):
    """omega from the embedding. [layers.<i>.weight]: one MPLinear a width, then one to the bases.
    forward(emb): emb [N, in_features] -> omega [N, out_features]."""

    def __init__(self,
        in_features,            # Width of the embedding.
        hidden_widths,          # Hidden widths, e.g. [128, 64].
        out_features,           # Number of LoRA bases m.
    ):
        if not hidden_widths or min(hidden_widths) < 1:
            raise ValueError(f'composition MLP widths must be positive integers, got {hidden_widths}')
        super().__init__()
        widths = [in_features, *hidden_widths, out_features]
        self.layers = torch.nn.ModuleList([MPLinear(a, b) for a, b in zip(widths[:-1], widths[1:])])

    def forward(self, emb):
        x = self.layers[0](emb)
        for layer in self.layers[1:]:
            x = layer(mp_silu(x))
        return x

#----------------------------------------------------------------------------
# The LoRA term of one MPConv: m bases of rank r composed by omega, added to the base output by the gain g.

@persistence.persistent_class
class MPUCLoRA(torch.nn.Module):
    """UC-LoRA of one 1x1 MPConv, in EDM2's form (see the module's docstring for the formula).

    Parameters, state-dict names in brackets:
        [lora_A] [m, r, C_in]: the down-projections A_1..A_m.
        [lora_B] [m, C_out, r]: the up-projections B_1..B_m.
        [lora_gain] []: g, zero at initialisation.
        [lora_mlp.layers.<i>.weight]: the composition MLP.
    forward(x, y, emb): x [N, C_in, H, W] the base's input, y [N, C_out, H, W] its output, emb [N, C_emb] or
        [1, C_emb] (EDM2's sampler passes one noise level for the whole batch) -> [N, C_out, H, W].
    """

    def __init__(self,
        in_channels,            # Input channels C_in of the base MPConv.
        out_channels,           # Output channels C_out of the base MPConv.
        emb_channels,           # Width of the embedding.
        bases,                  # Number of LoRA bases m.
        rank,                   # Rank r of each basis.
        mlp_widths,             # Hidden widths of the composition MLP.
    ):
        if bases < 1 or rank < 1:
            raise ValueError(f'LoRA needs bases >= 1 and rank >= 1, got bases={bases}, rank={rank}')
        super().__init__()
        # Unit-normal elements, as MPConv's weights start: rows of unit RMS, normalised anyway at every use.
        self.lora_A = torch.nn.Parameter(torch.randn(bases, rank, in_channels))
        self.lora_B = torch.nn.Parameter(torch.randn(bases, out_channels, rank))
        self.lora_gain = torch.nn.Parameter(torch.zeros([]))
        self.lora_mlp = CompositionMLP(in_features=emb_channels, hidden_widths=mlp_widths, out_features=bases)

    def forward(self, x, y, emb):
        bases, rank, in_channels = self.lora_A.shape
        A = mp_weight(self.lora_A, dim=2, training=self.training).to(x.dtype).reshape(bases * rank, in_channels)
        B = mp_weight(self.lora_B, dim=2, training=self.training).to(x.dtype).permute(1, 0, 2).reshape(-1, bases * rank)
        omega = self.lora_mlp(emb).to(x.dtype) / np.sqrt(bases) # [N, m]
        h = A @ x.flatten(2) # [N, m*r, HW]: A_i' x of every basis
        h = h * omega.repeat_interleave(rank, dim=1).unsqueeze(2) # basis i's r channels weighted by omega_i
        delta = (B @ h).reshape(y.shape)
        gain = self.lora_gain.to(y.dtype)
        return (y + gain * delta) / (1 + gain ** 2).sqrt()

#----------------------------------------------------------------------------
# The glue: Precond's constructor calls this on its U-Net.

def condition_attention(unet,
    lora        = 'none',       # Conditioning of the attention layers: 'none' or 'uc' (UC-LoRA).
    rank        = 4,            # Rank of each LoRA basis.
    bases       = 18,           # Number of LoRA bases per adapted layer.
    mlp_widths  = [128,64],     # Hidden widths of each composition MLP (paper Appendix A.5).
    conv_cond   = True,         # Does every Block keep its embedding scale (emb_linear)? False = "only LoRA".
):
    if lora not in LORA_MODES:
        raise ValueError(f'unknown LoRA mode "{lora}" (choose from {", ".join(LORA_MODES)})')
    if not conv_cond and lora != 'uc':
        raise ValueError('conv_cond=False needs lora="uc": nothing else would carry the noise level (and EDM2\'s embedding layers would train unused)')
    if lora == 'none':
        return
    blocks = [block for block in unet.modules() if getattr(block, 'num_heads', 0)]
    if not blocks:
        raise ValueError('the U-Net has no attention layers to condition (a Block has one head per channels_per_head channels: fewer build none)')

    emb_channels = unet.emb_noise.weight.shape[0] # The width of the emb that every Block receives.
    for block in blocks:
        for name in ADAPTED_LAYERS:
            base = getattr(block, name)
            out_channels, in_channels = base.weight.shape[:2]
            layer = MPUCLoRA(in_channels=in_channels, out_channels=out_channels, emb_channels=emb_channels, bases=bases, rank=rank, mlp_widths=mlp_widths)
            setattr(block, f'{name}_lora', layer) # Block.forward adds it to the base's output.
    if not conv_cond:
        for block in unet.modules():
            if hasattr(block, 'emb_linear'):
                block.emb_linear = None # Block.forward then scales its residual branch by 1.
                block.emb_gain = None

#----------------------------------------------------------------------------
