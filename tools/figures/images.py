"""Image grids and pixel conversions, shared by every tool that writes a picture."""

import os

import numpy as np
import PIL.Image

from tools import ROOT


def to_uint8(images, low=-1.0, high=1.0):
    """Floats in [low, high] (a tensor or an array, any shape) -> uint8 pixels, values outside clamped.

    The default range is the one the diffusion models work in: x = pixel / 127.5 - 1."""
    images = np.asarray(images)
    images = images.astype(np.promote_types(images.dtype, np.float32)) # float32 stays float32: same rounding as torch
    return np.rint((np.clip(images, low, high) - low) * (255 / (high - low))).astype(np.uint8)


def tile(images, columns=None, gap=0):
    """Images [N, H, W] or [N, H, W, C] (uint8) side by side in one array, `columns` a row (default:
    the squarest grid that leaves no place empty), left to right then top to bottom; unused places stay
    black. gap: pixels of white between neighbouring images (0: edge to edge, as untile() reads them)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    count, height, width, channels = images.shape
    columns = columns or next(c for c in range(int(np.ceil(np.sqrt(count))), count + 1) if count % c == 0)
    rows = int(np.ceil(count / columns))
    grid = np.full([rows * (height + gap) - gap, columns * (width + gap) - gap, channels], 255 if gap else 0, dtype=np.uint8)
    for i in range(rows * columns):
        top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
        grid[top:top + height, left:left + width] = images[i] if i < count else 0
    return grid[..., 0] if channels == 1 else grid


def untile(grid, height, width, count):
    """The first `count` images [count, height, width(, C)] of a grid that tile() made."""
    rows, columns = grid.shape[0] // height, grid.shape[1] // width
    images = grid[:rows * height, :columns * width].reshape(rows, height, columns, width, *grid.shape[2:]).swapaxes(1, 2)
    return images.reshape(rows * columns, height, width, *grid.shape[2:])[:count]


def save_grid(images, path, columns=None, scale=4, gap=0, caption=None, row_labels=None):
    """Write images [N, H, W] or [N, H, W, C] (uint8) as one PNG grid (tile()), each image enlarged `scale` times.

    columns: images a row (default: the squarest grid that leaves no cell empty). gap: white pixels
    between images, before enlarging. caption: text written above the grid, wrapped to its width.
    row_labels: a name for each row, written to its left (e.g. the class of a row of samples)."""
    grid = tile(images, columns, gap)
    picture = PIL.Image.fromarray(grid)
    picture = picture.resize([grid.shape[1] * scale, grid.shape[0] * scale], PIL.Image.NEAREST)
    if row_labels:
        picture = with_row_labels(picture, row_labels, row_height=(images.shape[1] + gap) * scale)
    if caption:
        picture = with_caption(picture, caption)
    picture.save(path)


def with_caption(picture, caption, font_size=14, margin=6):
    """The picture below `caption`, in black on white, wrapped to the picture's width (at least 320 pixels)."""
    import textwrap
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=font_size)
    width = max(picture.width, 320)
    characters = max(10, int((width - 2 * margin) / font.getlength('n'))) # an average letter is about as wide as an n
    lines = [line for paragraph in caption.split('\n') for line in textwrap.wrap(paragraph, characters, break_on_hyphens=False) or ['']] # file names stay whole
    line_height = font_size + 4
    captioned = PIL.Image.new(picture.mode, [width, picture.height + len(lines) * line_height + 2 * margin], 'white')
    draw = ImageDraw.Draw(captioned)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_height), line, fill='black', font=font)
    captioned.paste(picture, ((width - picture.width) // 2, len(lines) * line_height + 2 * margin))
    return captioned


def with_row_labels(picture, labels, row_height, font_size=14, margin=6):
    """The picture with a white margin on its left holding labels[i] beside the i-th band of row_height pixels."""
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=font_size)
    width = int(max(font.getlength(label) for label in labels)) + 2 * margin
    labelled = PIL.Image.new(picture.mode, [picture.width + width, picture.height], 'white')
    labelled.paste(picture, (width, 0))
    draw = ImageDraw.Draw(labelled)
    for i, label in enumerate(labels):
        draw.text((margin, i * row_height + row_height // 2 - font_size // 2), label, fill='black', font=font)
    return labelled


SMOKE_CAPTION = ('Smoke run: a few training steps on synthetic images, so these samples are noise by design '
                 '(it checks that every step runs, not what the model learns).')


def show_samples(images, out_path, caption, smoke=False, count=16, columns=None, row_labels=None):
    """A PNG grid of the first `count` samples ([N, H, W, 3] uint8), `columns` a row, 128 pixels each,
    a white line between them, `caption` above (what was sampled; for smoke runs, why it is noise) and
    row_labels, if given, on the left."""
    images = images[:count]
    caption = f'{caption}\n{SMOKE_CAPTION}' if smoke else caption
    save_grid(images, out_path, columns=columns, scale=max(1, 128 // images.shape[1]), gap=1, caption=caption, row_labels=row_labels)
    print(f'\nsample grid: {os.path.relpath(out_path, ROOT)}')
