"""What scoring needs to know about each upstream, in one object an upstream: how its commands are
launched on N processes, which files are its snapshots and how many training images each stands for,
how it generates one FID evaluation's images (resumably), and the paper's scoring protocol of its rows.

The row drivers (tools.drivers), scoring (tools.scoring.score), results and the checks read these
objects for how runs are scored; only where rows are shown (results' tables, the README's) does an
upstream's name decide something else (EDM2's rows, not the paper's, get a table of their own).

    EDM    generate.py, EDM's Heun sampler at the row's NFE; the minimum of 3 evaluations (EDM's tables)
    EDM2   its post-hoc EMA (reconstruct_phema.py), then generate_images.py as EDM's; the minimum of 3
    IDDPM  improved-diffusion's image_sample.py at all T steps (NFE = T); 1 evaluation (its paper's)

Smoke runs (tiny CPU networks on synthetic data) score 32 images an evaluation with the stand-in
detector against statistics of their own synthetic data.
"""

import glob
import os
import re
import shutil
import sys

import numpy as np
import PIL.Image

from tools import ROOT
from tools.data.dataset_check import DatasetError, check_edm_zip, check_image_folder
from tools.data.synthetic import write_folder
from tools.paper.rows import EDM2_PHEMA_STD, flag_value
from tools.scoring.fid_steps import reference_statistics
from tools.scoring.records import number_in_name
from tools.vendoring.run import run_step
from tools.vendoring.upstream import read_upstream

SMOKE_IMAGES = 32 # images an evaluation of a smoke run (16x16 or 32x32, stand-in detector)
SMOKE_CLASSES = 10 # classes of the synthetic smoke data, labelled for the conditional rows (CIFAR-10's 10)
PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82' # the last 12 bytes of every complete PNG file


def synthetic_images(folder, count, resolution, dry_run=False):
    """A synthetic image folder (tools.data.synthetic, written whole under a temporary name) for smoke runs,
    written once; checked at each use, and written again if it is not what it should be (it is this
    project's own data: a damaged one is replaced, not refused)."""
    if os.path.isdir(folder):
        try:
            check_image_folder(folder, resolution, SMOKE_CLASSES)
            return folder
        except DatasetError as err:
            print(f'{err}; writing it again')
            if dry_run:
                return folder
            shutil.rmtree(folder)
    if not dry_run:
        write_folder(folder, count=count, resolution=resolution, classes=SMOKE_CLASSES)
        print(f'wrote {count} images of {resolution}x{resolution} to {folder}')
    return folder


def smoke_reference(data, folder):
    """Stand-in reference statistics of a smoke run's own synthetic data."""
    return reference_statistics(data, os.path.join(folder, 'fid-ref-standin.npz'), 'standin')

#----------------------------------------------------------------------------
# EDM: network-snapshot-<kimg>.pkl, generate.py --seeds (one PNG a seed, so a rerun makes only the missing ones).

def seed_ranges(seeds):
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8', as EDM's generate.py --seeds reads lists."""
    parts, start = [], None
    for index, seed in enumerate(seeds):
        if start is None:
            start = seed
        if index + 1 == len(seeds) or seeds[index + 1] != seed + 1:
            parts.append(f'{start}' if start == seed else f'{start}-{seed}')
            start = None
    return ','.join(parts)


def is_complete_png(path):
    with open(path, 'rb') as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < len(PNG_END):
            return False
        f.seek(-len(PNG_END), os.SEEK_END)
        return f.read() == PNG_END


def missing_seeds(image_dir, seeds):
    """The seeds of `seeds` without a complete PNG in image_dir (generate.py --subdirs layout);
    truncated PNGs, left by a kill mid-write, are deleted."""
    done = set()
    for path in glob.glob(os.path.join(image_dir, '*', '*.png')):
        if is_complete_png(path):
            done.add(number_in_name(path))
        else:
            print(f'{os.path.relpath(path, ROOT)}: incomplete (killed while written?); generating it again')
            os.remove(path)
    return [seed for seed in seeds if seed not in done]


def reference(row, folder, smoke, dry_run, smoke_data):
    """The FID reference statistics of a run: a smoke run's of its synthetic data (stand-in detector); a
    file of this repository (ImageNet64, the mini rows) made once from the row's dataset with its
    detector; else the URL of EDM's published statistics."""
    ref = row.recipe.fid_ref
    if smoke:
        return ref if dry_run else smoke_reference(smoke_data(folder), folder)
    if ref.startswith('https://'):
        return ref
    return reference_statistics(os.path.join(ROOT, row.recipe.data), os.path.join(ROOT, ref), row.recipe.detector, dry_run)


def detector_of(row, smoke):
    return 'standin' if smoke else row.recipe.detector


def kid_reference(row, smoke):
    """For the digit detector (mini rows), KID beside FID: the dataset whose features (written once to
    the reference statistics' name + -features.npz) the samples' are compared with."""
    if detector_of(row, smoke) != 'digits':
        return {}
    return dict(kid_data=os.path.join(ROOT, row.recipe.data), kid_ref=os.path.join(ROOT, row.recipe.fid_ref.replace('.npz', '-features.npz')))


class Upstream:
    """What every upstream object has: its name in the table of rows and patches/, its tree (vendor/<tree>,
    from patches/<name>/UPSTREAM), the glob of its snapshot files, the FID evaluations a snapshot by
    default; and launcher(), images_seen(), smoke_data(), protocol(), evaluation_label() and generate()."""

    def __init__(self, name, snapshot_pattern, default_evaluations):
        self.name, self.snapshot_pattern, self.default_evaluations = name, snapshot_pattern, default_evaluations
        self.tree = read_upstream(name)['dir']

    def snapshot_name(self, number):
        """The snapshot file of `number` (kimg for EDM, optimiser steps for improved-diffusion)."""
        return self.snapshot_pattern.replace('*', f'{number:06d}')

    def snapshot_number(self, snapshot):
        """The number a snapshot's name carries (kimg or steps)."""
        return number_in_name(snapshot)

    def scorable(self, folder):
        """The snapshots that scoring can read or make (EDM2: one a training snapshot), oldest first."""
        return snapshots(folder, self)

    def prepare_snapshots(self, folder, which='all', dry_run=False):
        """Write the files that scoring reads but training does not, for the snapshots `which` selects (EDM2: post-hoc
        EMA); others have none."""


class EDMUpstream(Upstream):
    dataset_tool = ['dataset_tool.py'] # the command that writes EDM's zip from an image folder
    generate_script, network_flag = 'generate.py', '--network'

    def launcher(self, gpus):
        return [sys.executable] if gpus == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={gpus}']

    def images_seen(self, snapshot, train_batch):
        return number_in_name(snapshot) * 1000 # named by kimg

    def smoke_data(self, folder, dry_run=False):
        """A synthetic 16x16 dataset in EDM's zip format, written by the upstream's own dataset_tool.py under a
        temporary name, then renamed (a killed write never leaves a truncated zip under the name that is
        reused); checked at each use, and written again if it is not what it should be."""
        data = os.path.join(folder, 'synthetic-16x16.zip')
        if os.path.exists(data):
            try:
                check_edm_zip(data, 16, SMOKE_CLASSES)
                return data
            except DatasetError as err:
                print(f'{err}; writing it again')
        images = synthetic_images(os.path.join(folder, 'synthetic-images'), count=64, resolution=16, dry_run=dry_run)
        partial = os.path.join(folder, 'synthetic-16x16.partial.zip') # dataset_tool.py writes a zip for a name ending in .zip
        run_step([sys.executable, *self.dataset_tool, f'--source={images}', f'--dest={partial}'], self.tree, dry_run=dry_run)
        if not dry_run:
            os.replace(partial, data)
        return data

    def protocol(self, row, folder, smoke, evaluations=None, images=None, dry_run=False):
        """EDM's Heun sampler at the row's NFE (2 steps - 1), the minimum of 3 evaluations (EDM's tables),
        EDM's reference statistics; smoke runs: 4 steps and the stand-in detector."""
        steps = 4 if smoke else (row.nfe + 1) // 2
        return dict(steps=steps, nfe=2 * steps - 1, sampler=f"EDM's Heun sampler, {steps} steps", batch=64,
                    images=images or (SMOKE_IMAGES if smoke else row.recipe.fid_images),
                    evaluations=evaluations or row.recipe.fid_evaluations or self.default_evaluations,
                    ref=reference(row, folder, smoke, dry_run, self.smoke_data), detector=detector_of(row, smoke),
                    train_batch=int(flag_value(row.flags, '--batch', 0)), dry_run=dry_run, **kid_reference(row, smoke))

    def evaluation_label(self, evaluation, protocol):
        return f'seeds {seed_ranges(self.seeds(evaluation, protocol))}'

    def seeds(self, evaluation, protocol):
        """Evaluation k generates seeds k*N .. (k+1)*N - 1."""
        return list(range(evaluation * protocol['images'], (evaluation + 1) * protocol['images']))

    def generate(self, snapshot, image_dir, evaluation, protocol, launcher):
        self.generate_seeds(snapshot, image_dir, self.seeds(evaluation, protocol), protocol, launcher)

    def generate_seeds(self, snapshot, image_dir, seeds, protocol, launcher, class_label=None):
        """EDM's generate.py (EDM2: generate_images.py) with the Heun sampler at the protocol's steps, for the seeds still missing
        (class_label: generate.py --class; default: a random class a seed, as generate.py draws it)."""
        missing = missing_seeds(image_dir, seeds)
        if not missing:
            return
        if len(missing) < len(seeds):
            print(f'{os.path.relpath(image_dir, ROOT)}: {len(seeds) - len(missing)} of {len(seeds)} images there; generating the other {len(missing)}')
        run_step(launcher + [self.generate_script, f'{self.network_flag}={snapshot}', f'--outdir={image_dir}', f'--seeds={seed_ranges(missing)}',
                             '--subdirs', f'--steps={protocol["steps"]}', f'--batch={protocol["batch"]}']
                 + ([f'--class={class_label}'] if class_label is not None else []), self.tree, dry_run=protocol['dry_run'])

#----------------------------------------------------------------------------
# improved-diffusion: ema_0.9999_<step>.pt, image_sample.py --sample_dir (batches written as they finish).

SMOKE_MODEL = ['--image_size', 32, '--num_channels', 32, '--num_res_blocks', 1, '--learn_sigma', True, '--noise_schedule', 'cosine']
SMOKE_STEPS = 100 # diffusion steps of smoke runs (LoRA: 101, as 4001 in the paper's rows)


class IDDPMUpstream(Upstream):
    def launcher(self, gpus):
        return [sys.executable] if gpus == 1 else [os.path.join(os.path.dirname(sys.executable), 'mpiexec'), '-n', gpus, sys.executable]

    def images_seen(self, snapshot, train_batch):
        return number_in_name(snapshot) * train_batch # named by optimiser step

    def snapshot_name(self, number, ema_rate='0.9999'):
        return f'ema_{ema_rate}_{number:06d}.pt'

    def smoke_data(self, folder, dry_run=False):
        return synthetic_images(os.path.join(folder, 'synthetic-32x32'), count=16, resolution=32, dry_run=dry_run)

    def model_flags(self, row, smoke):
        """image_sample.py's and image_train.py's model flags of the row (smoke runs: a tiny model, 100 / 101 steps)."""
        if not smoke:
            return list(row.flags)
        class_flags = ['--class_cond', True, '--num_classes', 10] if '--class_cond' in row.recipe.flags else []
        variant_flags = list(row.variant_flags)
        index = variant_flags.index('--diffusion_steps') # the row's 4000 / 4001 steps scaled down to 100 / 101
        variant_flags[index + 1] = SMOKE_STEPS + int(variant_flags[index + 1]) % 1000
        return SMOKE_MODEL + class_flags + variant_flags

    def protocol(self, row, folder, smoke, evaluations=None, images=None, dry_run=False):
        """image_sample.py at the full number of steps (NFE = T), one FID evaluation (improved-diffusion's
        paper reports one: each is 50,000 samples at 4,000 steps); smoke runs: the stand-in detector."""
        flags = self.model_flags(row, smoke)
        steps = int(flag_value(flags, '--diffusion_steps'))
        respaced = flag_value(row.recipe.sample_flags, '--timestep_respacing')
        sampler = f"improved-diffusion's sampler, {respaced} of its {steps} steps (respaced)" if respaced else f"improved-diffusion's sampler, all {steps} steps"
        return dict(model_flags=flags, sample_flags=list(row.recipe.sample_flags), nfe=int(respaced or steps), sampler=sampler,
                    batch=8 if smoke else 256, images=images or (SMOKE_IMAGES if smoke else row.recipe.fid_images),
                    evaluations=evaluations or row.recipe.fid_evaluations or self.default_evaluations,
                    ref=reference(row, folder, smoke, dry_run, self.smoke_data), detector=detector_of(row, smoke),
                    train_batch=4 if smoke else int(flag_value(row.recipe.train_flags, '--batch_size')), dry_run=dry_run,
                    **kid_reference(row, smoke))

    def evaluation_label(self, evaluation, protocol):
        return f'--seed {evaluation}'

    def generate(self, snapshot, image_dir, evaluation, protocol, launcher):
        """improved-diffusion's image_sample.py: batches written as they finish (resumed: the missing
        ones), seeded by the evaluation; then one PNG a sample for fid.py."""
        batches = os.path.join(image_dir, 'batches')
        run_step(launcher + ['scripts/image_sample.py', '--model_path', snapshot, *protocol['model_flags'], *protocol['sample_flags'],
                             '--num_samples', protocol['images'],
                             '--batch_size', protocol['batch'], '--sample_dir', batches, '--seed', evaluation], self.tree,
                 dry_run=protocol['dry_run'], env=dict(OPENAI_LOGDIR=image_dir))
        if protocol['dry_run']:
            return
        index = 0
        for path in sorted(glob.glob(os.path.join(batches, 'batch_*.npz'))):
            for image in np.load(path)['arr_0']:
                folder = os.path.join(image_dir, f'{index - index % 1000:06d}')
                os.makedirs(folder, exist_ok=True)
                PIL.Image.fromarray(image).save(os.path.join(folder, f'{index:06d}.png'))
                index += 1


#----------------------------------------------------------------------------
# EDM2: training writes network-snapshot-<kimg>-<std>.pkl, one a power-function EMA profile (0.050 and 0.100);
# the network scored at a snapshot is the post-hoc EMA of relative length EDM2_PHEMA_STD that
# reconstruct_phema.py makes from them, phema-<kimg>-<std>.pkl, as EDM2 reports its networks. Sampling:
# generate_images.py, EDM2's Heun sampler (its own edm_sampler), resumable as EDM's generate.py.

def kimg_to_nimg(kimg):
    """The training images of an EDM2 snapshot named by kimg (EDM2 counts in multiples of 1,024; reconstruct_phema.py's rule)."""
    return (kimg * 1000 + 999) // 1024 * 1024


class EDM2Upstream(EDMUpstream):
    dataset_tool = ['dataset_tool.py', 'convert']
    generate_script, network_flag = 'generate_images.py', '--net'

    def __init__(self, name, default_evaluations, phema_std):
        super().__init__(name, f'phema-*-{phema_std:.3f}.pkl', default_evaluations)
        self.phema_std = phema_std

    def snapshot_name(self, number):
        return f'phema-{number:07d}-{self.phema_std:.3f}.pkl' # reconstruct_phema.py's name for kimg `number`

    def snapshot_number(self, snapshot):
        """kimg: the first of the two numbers of <prefix>-<kimg>-<std>.pkl."""
        return int(re.fullmatch(r'.*-(\d+)-\d+\.\d+\.pkl', os.path.basename(snapshot))[1])

    def images_seen(self, snapshot, train_batch):
        return kimg_to_nimg(self.snapshot_number(snapshot))

    def scorable(self, folder):
        """One training snapshot a kimg, oldest first: each stands for the post-hoc EMA network that
        prepare_snapshots() makes at its kimg (at 0 kimg: the untrained network)."""
        trained = {self.snapshot_number(path): path for path in glob.glob(os.path.join(folder, 'network-snapshot-*-*.pkl'))}
        return [trained[kimg] for kimg in sorted(trained)]

    def prepare_snapshots(self, folder, which='all', dry_run=False, kimgs=None):
        """The post-hoc EMA network at each training snapshot that `which` selects (or at `kimgs`), if not yet
        reconstructed: reconstruct_phema.py from the snapshots up to it, written whole or not at all (patch 0004)."""
        if kimgs is None:
            kimgs = [self.snapshot_number(path) for path in select(self.scorable(folder), which, self)]
        for kimg in kimgs:
            phema = os.path.join(folder, self.snapshot_name(kimg))
            if os.path.exists(phema):
                continue
            if kimg == 0:
                # Every EMA profile starts as the initial network, and training saves them before its first step; but
                # reconstruct_phema.py takes --outkimg=1 and up. The post-hoc EMA at time 0 is that saved network.
                untrained = sorted(glob.glob(os.path.join(folder, 'network-snapshot-0000000-*.pkl')))[0]
                print(f'{os.path.relpath(phema, ROOT)}: the untrained network, copied from {os.path.basename(untrained)}', flush=True)
                if not dry_run:
                    shutil.copyfile(untrained, phema + '.partial') # renamed when whole, as reconstruct_phema.py writes
                    os.replace(phema + '.partial', phema)
            else:
                run_step([sys.executable, 'reconstruct_phema.py', f'--indir={folder}', '--inprefix=network-snapshot', f'--outdir={folder}',
                              f'--outstd={self.phema_std:.3f}', f'--outkimg={kimg}', '--skip'], self.tree, dry_run=dry_run)

    def protocol(self, row, folder, smoke, evaluations=None, images=None, dry_run=False):
        protocol = super().protocol(row, folder, smoke, evaluations, images, dry_run)
        protocol['sampler'] = f"EDM2's Heun sampler (generate_images.py), {protocol['steps']} steps, post-hoc EMA {self.phema_std:.3f}"
        return protocol


EDM = EDMUpstream('edm', 'network-snapshot-*.pkl', default_evaluations=3) # EDM's tables: the minimum of 3
IDDPM = IDDPMUpstream('iddpm', 'ema_*_*.pt', default_evaluations=1) # its paper reports 1; the EMA rate: 0.9999, mini rows 0.999
EDM2 = EDM2Upstream('edm2', default_evaluations=3, phema_std=EDM2_PHEMA_STD) # EDM2's paper: the minimum of 3, as EDM's
UPSTREAMS = {upstream.name: upstream for upstream in (EDM, IDDPM, EDM2)}


def snapshots(folder, upstream):
    """The run's snapshots, oldest first."""
    return sorted(glob.glob(os.path.join(folder, upstream.snapshot_pattern)), key=upstream.snapshot_number)


def select(paths, which, upstream):
    """--snapshots: 'all', 'last', or a comma list of the numbers in their names (kimg or steps)."""
    if which == 'all' or not paths:
        return paths
    if which == 'last':
        return paths[-1:]
    wanted = {int(number) for number in which.split(',')}
    return [path for path in paths if upstream.snapshot_number(path) in wanted]
