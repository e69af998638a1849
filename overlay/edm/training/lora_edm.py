"""EDM glue: conditioning of the attention layers of SongUNet (DDPM++, NCSN++) and DhariwalUNet (ADM).

Three modes, one per attention UNetBlock (see patches/edm):
- UC-LoRA (paper Section 4.1): qkv and proj get LoRA bases composed by an MLP on the block's
  embedding emb (noise level, and class where the network has map_label).
- ClassLoRA (Section 3.2, Appendix C): the network's class input no longer enters emb (map_label
  is removed: the base is EDM's unconditional network); instead qkv and proj get one LoRA basis
  per class, weighted by the class vector.
- adaLN (Section 5.5): norm2, the normalisation in front of qkv, gets a scale and shift
  regressed from emb (training/adaln.py).
The U-Nets call condition_attention() at the end of their constructor, after the base network has
drawn all its random numbers: the base weights are the same as without it for the same seed. Only
the layer objects end up in the network and its pickles; this module is not needed to load a
snapshot. freeze_base() is LoRA-only fine-tuning (train.py --finetune).
"""

from torch_utils import distributed as dist
from training.adaln import AdaLNGroupNorm
from training.lora import ClassLoRAConv, UCLoRAConv

LORA_MODES = ['none', 'uc', 'class']
LORA_SCALES = ['fixed', 'trainable']
ADAPTED_LAYERS = ['qkv', 'proj'] # The 1x1 convolutions of each attention UNetBlock.

def condition_attention(unet,
    lora        = 'none',       # LoRA conditioning: 'none', 'uc' (UC-LoRA) or 'class' (ClassLoRA).
    lora_rank   = 4,            # Rank of each LoRA basis.
    lora_bases  = 18,           # UC-LoRA: number of LoRA bases per adapted layer (ClassLoRA: one per class).
    lora_mlp    = [128,64],     # UC-LoRA: hidden widths of each composition-weight MLP (paper Appendix A.5).
    lora_bias   = True,         # UC-LoRA: per-basis bias term of the authors' release (counted in the paper's Table 1).
    lora_scale  = 'fixed',      # Scale of the LoRA update: 'fixed' (1, the paper's text) or 'trainable' (a scalar
                                # per adapted layer, initialised to 1: the paper's FFHQ count has one, see tools/paper/rows.py).
    adaln       = False,        # adaLN on the attention's input normalisation instead of LoRA.
    conv_cond   = True,         # Does the U-Net keep the scale-and-shift (affine) of its convolutions?
):
    if lora not in LORA_MODES:
        raise ValueError(f'unknown LoRA mode "{lora}" (choose from {", ".join(LORA_MODES)})')
    if lora_scale not in LORA_SCALES:
        raise ValueError(f'unknown LoRA scale "{lora_scale}" (choose from {", ".join(LORA_SCALES)})')
    if adaln and lora != 'none':
        raise ValueError('adaLN and LoRA condition the same attention layers: choose one')
    if not conv_cond and lora != 'uc' and not adaln:
        raise ValueError('--conv-cond=False needs --lora=uc or --adaln=True: nothing else would carry the noise level')
    if lora == 'class' and unet.map_label is None:
        raise ValueError('ClassLoRA needs class labels: train a class-conditional dataset (--cond=True)')
    if lora == 'none' and not adaln:
        return
    blocks = [block for block in unet.modules() if getattr(block, 'num_heads', 0)]
    if not blocks:
        raise ValueError(f'{type(unet).__name__} has no attention layers to condition')

    if lora == 'class':
        num_classes = unet.map_label.in_features
        unet.map_label = None # The base is the unconditional network: the class reaches the attention only.
    for block in blocks:
        if adaln:
            block.norm2 = AdaLNGroupNorm.from_base(block.norm2, emb_channels=block.emb_channels)
            block.attn_cond = 'adaln' # UNetBlock.forward now passes emb to norm2.
            continue
        for name in ADAPTED_LAYERS:
            base = getattr(block, name)
            if lora == 'uc':
                layer = UCLoRAConv.from_base(base, rank=lora_rank, trainable_scale=(lora_scale == 'trainable'),
                    bases=lora_bases, emb_channels=block.emb_channels, mlp_widths=lora_mlp, lora_bias=lora_bias)
            else:
                layer = ClassLoRAConv.from_base(base, rank=lora_rank, trainable_scale=(lora_scale == 'trainable'), num_classes=num_classes)
            setattr(block, name, layer)
        block.attn_cond = lora # UNetBlock.forward now passes emb (UC-LoRA) or the class vector (ClassLoRA) to qkv and proj.


def is_lora_parameter(name):
    """Does a parameter name (as named_parameters() gives it) belong to a LoRA layer's own parameters?"""
    return any(part.startswith('lora_') for part in name.split('.'))


def freeze_base(net):
    """LoRA-only fine-tuning: every parameter but the LoRA layers' own stops training."""
    trainable = 0
    for name, param in net.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
        trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise ValueError('LoRA-only fine-tuning needs LoRA layers (--lora=uc or --lora=class)')
    total = sum(param.numel() for param in net.parameters())
    dist.print0(f'LoRA-only fine-tuning: training {trainable:,} of {total:,} parameters (the LoRA layers); the rest is frozen.')
