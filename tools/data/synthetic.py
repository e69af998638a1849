"""Write a small synthetic image folder in the layout EDM's dataset_tool.py reads.

    python -m tools.data.synthetic --out DIR [--count 64] [--resolution 16] [--classes 10] [--seed 0]

Images are PNGs with a smooth per-class colour gradient plus noise, so that a few training steps
see structure. The class label is in two places, so that both upstreams read it their own way:
dataset.json ({"labels": [[name, class], ...]}, EDM's dataset_tool.py) and the file name
(c<class>_<index>.png: improved-diffusion takes the class from the text before "_").
Used by the SMOKE=1 targets and the tests: real data cannot be downloaded there.
"""

import argparse
import json
import os
import shutil

import numpy as np
import PIL.Image


def write_folder(out, count=64, resolution=16, classes=10, seed=0):
    """Write the folder `out` (which must not exist, or be empty) whole under a temporary name, then rename
    it: a write killed midway leaves no folder that looks written (smoke runs reuse one that exists)."""
    out = str(out)
    partial = out + '.partial'
    shutil.rmtree(partial, ignore_errors=True) # left by a killed write
    os.makedirs(partial)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, resolution)
    labels = []
    for index in range(count):
        label = index % classes
        colour = np.array([(label * 0.37) % 1, (label * 0.61) % 1, (label * 0.83) % 1])
        image = ramp[:, None, None] * colour + (1 - ramp[None, :, None]) * (1 - colour)
        image = np.clip(image + rng.normal(0, 0.05, size=image.shape), 0, 1)
        name = f'c{label}_{index:05d}.png'
        PIL.Image.fromarray((image * 255).astype(np.uint8), 'RGB').save(os.path.join(partial, name))
        labels.append([name, label])
    with open(os.path.join(partial, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)
    os.replace(partial, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='folder to write (created; not an existing one)')
    parser.add_argument('--count', type=int, default=64, help='number of images')
    parser.add_argument('--resolution', type=int, default=16, help='width and height in pixels')
    parser.add_argument('--classes', type=int, default=10, help='number of class labels')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    args = parser.parse_args()
    if args.count < 1 or args.resolution < 4 or args.classes < 1:
        parser.error('need --count >= 1, --resolution >= 4 and --classes >= 1')
    if os.path.exists(args.out) and not (os.path.isdir(args.out) and not os.listdir(args.out)):
        parser.error(f'--out {args.out} exists; give a new folder')
    write_folder(args.out, args.count, args.resolution, args.classes, args.seed)
    print(f'wrote {args.count} images of {args.resolution}x{args.resolution} to {args.out}')


if __name__ == '__main__':
    main()
