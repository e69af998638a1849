"""tools/images.py: the pixel conversion and the PNG grid every tool writes with."""

import numpy as np
import PIL.Image

from tools.images import save_grid, to_uint8


def test_model_range_maps_to_pixels_with_clamping():
    assert to_uint8(np.array([-1.0, -0.5, 0.0, 1.0, 1.7, -3.0])).tolist() == [0, 64, 128, 255, 255, 0]
    assert to_uint8(np.array([0.0, 10.0]), low=0, high=10).tolist() == [0, 255]


def test_grid_places_each_image_in_order_and_leaves_no_cell_empty(tmp_path):
    images = np.stack([np.full((3, 5, 3), 10 * i, dtype=np.uint8) for i in range(8)])
    save_grid(images, tmp_path / 'grid.png', scale=2)
    grid = np.asarray(PIL.Image.open(tmp_path / 'grid.png'))
    assert grid.shape == (2 * 3 * 2, 4 * 5 * 2, 3), '8 images: 4 columns, 2 rows, each enlarged twice'
    for i in range(8):
        row, column = divmod(i, 4)
        assert (grid[row * 6:(row + 1) * 6, column * 10:(column + 1) * 10] == 10 * i).all(), i


def test_grey_images_make_a_grey_png_with_the_columns_asked(tmp_path):
    images = np.arange(6, dtype=np.uint8).reshape(6, 1, 1) * 40
    save_grid(images, tmp_path / 'grid.png', columns=3, scale=1)
    grid = np.asarray(PIL.Image.open(tmp_path / 'grid.png'))
    assert grid.tolist() == [[0, 40, 80], [120, 160, 200]]
