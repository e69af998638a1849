"""Image grids and pixel conversions, shared by every tool that writes a picture."""

import numpy as np
import PIL.Image


def to_uint8(images, low=-1.0, high=1.0):
    """Floats in [low, high] (a tensor or an array, any shape) -> uint8 pixels, values outside clamped.

    The default range is the one the diffusion models work in: x = pixel / 127.5 - 1."""
    images = np.asarray(images)
    images = images.astype(np.promote_types(images.dtype, np.float32)) # float32 stays float32: same rounding as torch
    return np.rint((np.clip(images, low, high) - low) * (255 / (high - low))).astype(np.uint8)


def tile(images, columns=None):
    """Images [N, H, W] or [N, H, W, C] (uint8) side by side in one array, `columns` a row (default:
    the squarest grid that leaves no place empty), left to right then top to bottom; unused places stay black."""
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
    return grid[..., 0] if channels == 1 else grid


def untile(grid, height, width, count):
    """The first `count` images [count, height, width(, C)] of a grid that tile() made."""
    rows, columns = grid.shape[0] // height, grid.shape[1] // width
    images = grid[:rows * height, :columns * width].reshape(rows, height, columns, width, *grid.shape[2:]).swapaxes(1, 2)
    return images.reshape(rows * columns, height, width, *grid.shape[2:])[:count]


def save_grid(images, path, columns=None, scale=4):
    """Write images [N, H, W] or [N, H, W, C] (uint8) as one PNG grid (tile()), each image enlarged `scale` times.

    columns: images a row (default: the squarest grid that leaves no cell empty)."""
    grid = tile(images, columns)
    picture = PIL.Image.fromarray(grid)
    picture.resize([grid.shape[1] * scale, grid.shape[0] * scale], PIL.Image.NEAREST).save(path)
