"""Check a dataset before a run trains on it, in one line naming the file and the problem.

    check_edm_zip(path, resolution, classes)       EDM's dataset zip, as its dataset_tool.py writes it
    check_image_folder(path, resolution, classes)  improved-diffusion's image folder

Each lists the images as the upstream lists them, opens one (reading every image of a 50,000-image
dataset would cost as much as an epoch), checks its resolution and its 3 channels, and for a
class-conditional run (classes > 0) the labels the upstream would read: EDM's dataset.json, the
file names' prefix for improved-diffusion. A problem raises DatasetError: a garbage or truncated zip
would otherwise end in a traceback of every training process, and a dataset of another resolution,
or without labels, would train a network of the wrong shape, or an unconditional one, silently.
"""

import json
import os
import zipfile
import zlib

import PIL.Image

from tools import ROOT


class DatasetError(Exception):
    """A dataset a run cannot train on; its message is one line naming the file and the problem."""


def shown(path):
    """The path as the user knows it: relative to the repository root where it is inside."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def check_image(path, name, open_file, resolution):
    """One image, decoded whole (a truncated PNG fails only there): width and height `resolution`, 3 channels."""
    try:
        with open_file() as f:
            image = PIL.Image.open(f)
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err: # PIL raises all of these for broken files
        raise DatasetError(f'{shown(path)}: cannot read its image {name} ({err})') from None
    width, height = image.size
    if (width, height) != (resolution, resolution):
        raise DatasetError(f'{shown(path)}: its images are {width}x{height} ({name}), not the {resolution}x{resolution} the run trains at')
    channels = len(image.getbands()) # as EDM's loader sees them: 'L' and 'P' are 1, 'RGBA' 4
    if channels != 3:
        raise DatasetError(f'{shown(path)}: its images have {channels} channel(s) ({name}: {image.mode}), not the 3 (RGB) the run trains on')


def check_edm_zip(path, resolution, classes=0):
    """EDM's zip as training/dataset.py's ImageFolderDataset reads it: the members with an image extension
    PIL knows are the images, sorted by name; labels in dataset.json, {"labels": [[name, class], ...]}
    (null when dataset_tool.py found none). classes: the classes a conditional run needs (0: unconditional)."""
    if not os.path.isfile(path):
        raise DatasetError(f'{shown(path)}: not a file (EDM\'s dataset is a zip that its dataset_tool.py writes)')
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            PIL.Image.init() # as ImageFolderDataset does, so that EXTENSION lists every format
            images = sorted(name for name in names if os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION)
            if not images:
                raise DatasetError(f'{shown(path)}: no images in the zip')
            check_image(path, images[0], lambda: z.open(images[0]), resolution)
            if classes:
                check_edm_labels(path, z, names, images, classes)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise DatasetError(f'{shown(path)}: not a readable zip, truncated or damaged ({err})') from None


def check_edm_labels(path, z, names, images, classes):
    """dataset.json: a label for every image, integers 0 to classes - 1, each used (EDM's label
    dimension is the largest label + 1, so missing classes would change the network's shape)."""
    if 'dataset.json' not in names:
        raise DatasetError(f'{shown(path)}: no dataset.json, so no class labels for a class-conditional run')
    try:
        labels = json.loads(z.read('dataset.json')).get('labels')
        labels = dict(labels) if labels is not None else None
    except (ValueError, TypeError, AttributeError) as err:
        raise DatasetError(f'{shown(path)}: its dataset.json is not {{"labels": [[name, class], ...]}} ({err})') from None
    if not labels:
        raise DatasetError(f'{shown(path)}: its dataset.json has no labels ("labels": null), which a class-conditional run needs')
    unlabelled = [name for name in images if name not in labels]
    if unlabelled:
        raise DatasetError(f'{shown(path)}: its dataset.json labels only {len(images) - len(unlabelled)} of its {len(images)} images '
                           f'({unlabelled[0]} has none)')
    values = [labels[name] for name in images]
    strange = next((value for value in values if type(value) is not int), None)
    if strange is not None:
        raise DatasetError(f'{shown(path)}: its dataset.json labels are not class numbers ({strange!r})')
    if set(values) != set(range(classes)):
        raise DatasetError(f'{shown(path)}: its dataset.json labels give {len(set(values))} classes ({min(values)} to {max(values)}), '
                           f'not the {classes} classes 0 to {classes - 1} the run needs')


# improved-diffusion's image_datasets.py _list_image_files_recursively: these extensions, any case.
IDDPM_EXTENSIONS = ('jpg', 'jpeg', 'png', 'gif')


def iddpm_image_files(folder):
    """The image files below `folder`, in the order improved-diffusion lists them (sorted a folder at a time)."""
    found = []
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if '.' in entry and entry.split('.')[-1].lower() in IDDPM_EXTENSIONS:
            found.append(full)
        elif os.path.isdir(full):
            found.extend(iddpm_image_files(full))
    return found


def check_image_folder(path, resolution, classes=0):
    """improved-diffusion's image folder: at least one image, the first of them `resolution` square with 3
    channels, and for a class-conditional run (classes > 0) that many class names, the text of the file
    names before the first "_" (image_datasets.py numbers the sorted names 0, 1, ...)."""
    if not os.path.isdir(path):
        raise DatasetError(f'{shown(path)}: not a folder (improved-diffusion reads a folder of images)')
    files = iddpm_image_files(path)
    if not files:
        raise DatasetError(f'{shown(path)}: no images in the folder (.png, .jpg, .jpeg or .gif files)')
    check_image(path, os.path.relpath(files[0], path), lambda: open(files[0], 'rb'), resolution)
    if classes:
        names = sorted({os.path.basename(file).split('_')[0] for file in files})
        if len(names) != classes:
            listed = ', '.join(names[:5]) + (', ...' if len(names) > 5 else '')
            raise DatasetError(f'{shown(path)}: its file names give {len(names)} classes ({listed}: the text before the first "_"), '
                               f'not the {classes} the run needs')
