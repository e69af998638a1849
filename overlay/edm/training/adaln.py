"""adaLN on the input normalisation of EDM's attention (paper Section 5.5, Table 3).

DiT (Peebles & Xie, 2023) conditions its attention with adaLN: the normalised activations are
multiplied by 1 + scale and shifted by shift, both regressed from the condition embedding. Here
that replaces `norm2`, the GroupNorm in front of `qkv` in EDM's UNetBlock. The linear layer starts
at zero, so the block starts out computing exactly what it computed unconditioned. DiT's
adaLN-Zero also gates the attention output with a zero-initialised factor; the paper compares
with adaLN and names no gate, and a zero gate would switch the attention off at initialisation,
so there is none.

This file imports only torch and EDM's torch_utils: EDM pickles embed its source and re-run it
when loading, so it must run beside a pristine upstream tree.
"""

import torch
from torch_utils import persistence

#----------------------------------------------------------------------------
# GroupNorm (as EDM's) followed by a per-sample scale and shift regressed from emb.

@persistence.persistent_class
class AdaLNGroupNorm(torch.nn.Module):
    """Parameters: [weight], [bias] [C]: the base GroupNorm's own, under their upstream names (see
    from_base); [adaln.weight] [2C, emb_channels], [adaln.bias] [2C]: scale and shift, zero at init.
    forward(x, emb): x [N, C, H, W], emb [N, emb_channels] or [1, emb_channels] -> [N, C, H, W]."""

    def __init__(self,
        num_channels,           # Channels C of the normalised activations.
        emb_channels,           # Width of the condition embedding.
        num_groups,             # Groups of the base GroupNorm.
        eps,                    # Epsilon of the base GroupNorm.
    ):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels)) # placeholders until adopt_base()
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))
        self.adaln = torch.nn.Linear(emb_channels, 2 * num_channels)
        torch.nn.init.zeros_(self.adaln.weight)
        torch.nn.init.zeros_(self.adaln.bias)

    @classmethod
    def from_base(cls, base, emb_channels):
        """The adaLN layer on EDM's GroupNorm `base`: channels, groups and eps read from it, its weight and bias adopted."""
        return cls(num_channels=base.weight.shape[0], emb_channels=emb_channels, num_groups=base.num_groups, eps=base.eps).adopt_base(base)

    def adopt_base(self, base):
        """Take over the parameter objects of EDM's GroupNorm `base`: same values, same names."""
        if (base.num_groups, base.eps, base.weight.shape) != (self.num_groups, self.eps, self.weight.shape):
            raise ValueError(f'adaLN layer ({self.num_groups} groups, eps {self.eps}, {self.weight.shape[0]} channels) '
                             f'does not match its base GroupNorm ({base.num_groups}, {base.eps}, {base.weight.shape[0]})')
        self.weight = base.weight
        self.bias = base.bias
        return self

    def forward(self, x, emb):
        x = torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)
        scale, shift = self.adaln(emb.to(self.adaln.weight.dtype)).to(x.dtype).unsqueeze(2).unsqueeze(3).chunk(chunks=2, dim=1)
        return torch.addcmul(shift, x, scale + 1)

#----------------------------------------------------------------------------
