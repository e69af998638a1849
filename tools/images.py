"""Image grids and pixel conversions, shared by every tool that writes a picture."""

import numpy as np
import PIL.Image


def to_uint8(images, low=-1.0, high=1.0):
    """Floats in [low, high] (a tensor or an array, any shape) -> uint8 pixels, values outside clamped.

    The default range is the one the diffusion models work in: x = pixel / 127.5 - 1."""
    images = np.asarray(images)
    images = images.astype(np.promote_types(images.dtype, np.float32)) # float32 stays float32: same rounding as torch
    return np.rint((np.clip(images, low, high) - low) * (255 / (high - low))).astype(np.uint8)


def save_grid(images, path, columns=None, scale=4):
    """Write images [N, H, W] or [N, H, W, C] (uint8) as one PNG grid, each image enlarged `scale` times.

    columns: images a row (default: the squarest grid that leaves no cell empty)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    count, height, width, channels = images.shape
    columns = columns or next(c for c in range(int(np.ceil(np.sqrt(count))), count + 1) if count % c == 0)
    rows = int(np.ceil(count / columns))
    grid = np.zeros([rows * height, columns * width, channels], dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = (i // columns) * height, (i % columns) * width
        grid[top:top + height, left:left + width] = image
    picture = PIL.Image.fromarray(grid[..., 0] if channels == 1 else grid)
    picture.resize([columns * width * scale, rows * height * scale], PIL.Image.NEAREST).save(path)
