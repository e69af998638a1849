"""Write image folders in the layout improved-diffusion reads, and back from its sample files.

    python -m tools.data.image_folder cifar10 ARCHIVE OUT          # cifar-10-python.tar.gz -> OUT/<class>_<index>.png
    python -m tools.data.image_folder imagenet64 ZIP [ZIP ...] OUT # Imagenet64_train_part*_npz.zip -> OUT/<label>_<index>.png
    python -m tools.data.image_folder npz SAMPLES.npz OUT          # image_sample.py output -> OUT/<index>.png (for fid.py)

improved-diffusion's load_data() reads every image below a folder and, with --class_cond, takes the
class from the file name up to the first "_" (its own datasets/cifar10.py writes such names, but
needs torchvision). Classes are sorted by name: CIFAR-10's names sort in its label order.
A folder that already holds the expected number of images is kept.
"""

import argparse
import io
import os
import pickle
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image

CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def write_images(batches, count, out):
    """Write (images [N, H, W, 3] uint8, names) batches to out/; a partial folder never looks complete."""
    if os.path.isdir(out):
        if len(os.listdir(out)) == count:
            print(f'{out}: {count} images already there')
            return
        # Not written here (this function renames a whole folder into place): another's, or damaged.
        sys.exit(f'image_folder: {out} holds {len(os.listdir(out))} files, not the {count} images expected; remove it and run again')
    partial = out + '.partial'
    os.makedirs(partial, exist_ok=True)
    written = 0
    for images, names in batches:
        for image, name in zip(images, names):
            PIL.Image.fromarray(image).save(os.path.join(partial, name))
        written += len(names)
        print(f'\r{out}: {written} / {count} images', end='', file=sys.stderr)
    print(file=sys.stderr)
    if written != count:
        sys.exit(f'image_folder: expected {count} images, found {written}')
    os.replace(partial, out)
    print(f'{out}: {count} images')


def cifar10_batches(archive):
    """CIFAR-10's five training batches, images numbered in archive order."""
    first = 0
    with tarfile.open(archive, 'r:gz') as tar:
        for batch in range(1, 6):
            data = pickle.load(tar.extractfile(f'cifar-10-batches-py/data_batch_{batch}'), encoding='bytes')
            names = [f'{CIFAR10_CLASSES[label]}_{first + i:05d}.png' for i, label in enumerate(data[b'labels'])]
            first += len(names)
            yield data[b'data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), names


def imagenet64_batches(archives):
    """The official downsampled ImageNet 64x64 (Chrabaszcz et al. 2017) training batches, 1-based labels."""
    first = 0
    for archive in archives:
        with zipfile.ZipFile(archive) as z:
            for member in sorted(n for n in z.namelist() if os.path.basename(n).startswith('train_data_batch_')):
                data = np.load(io.BytesIO(z.read(member)))
                names = [f'{label:04d}_{first + i:07d}.png' for i, label in enumerate(data['labels'])]
                first += len(names)
                yield data['data'].reshape(-1, 3, 64, 64).transpose(0, 2, 3, 1), names


def npz_batches(samples):
    images = np.load(samples)['arr_0']
    yield images, [f'{index:06d}.png' for index in range(len(images))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('kind', choices=['cifar10', 'imagenet64', 'npz'])
    parser.add_argument('inputs', nargs='+', help='archive(s) or .npz file')
    parser.add_argument('out', help='folder to write')
    args = parser.parse_args()
    missing = [path for path in args.inputs if not os.path.isfile(path)]
    if missing:
        parser.error(f'no such file: {", ".join(missing)}')
    if args.kind != 'imagenet64' and len(args.inputs) != 1:
        parser.error(f'{args.kind} takes one input file')
    try:
        if args.kind == 'cifar10':
            write_images(cifar10_batches(args.inputs[0]), 50000, args.out)
        elif args.kind == 'imagenet64':
            write_images(imagenet64_batches(args.inputs), 1281167, args.out)
        else:
            write_images(npz_batches(args.inputs[0]), len(np.load(args.inputs[0])['arr_0']), args.out)
    except (OSError, KeyError, tarfile.TarError, zipfile.BadZipFile) as err:
        sys.exit(f'image_folder: cannot read {", ".join(args.inputs)}: {err}')


if __name__ == '__main__':
    main()
