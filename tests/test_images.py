"""tools/figures/images.py: the pixel conversion and the PNG grid every tool writes with."""

import numpy as np
import PIL.Image

from tools.figures.images import save_grid, tile, to_uint8


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


def test_a_gap_is_white_and_an_unused_place_stays_black():
    images = np.stack([np.full((2, 3), 10 * (i + 1), dtype=np.uint8) for i in range(3)])
    grid = tile(images, columns=2, gap=1)
    assert grid.shape == (2 * 2 + 1, 2 * 3 + 1)
    assert (grid[:2, :3] == 10).all() and (grid[:2, 4:] == 20).all() and (grid[3:, :3] == 30).all()
    assert (grid[2, :] == 255).all() and (grid[:, 3] == 255).all(), 'one white line between rows and between columns'
    assert (grid[3:, 4:] == 0).all(), 'the fourth place has no image'


def test_a_caption_goes_above_the_unchanged_grid(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    save_grid(images, tmp_path / 'plain.png', scale=2)
    save_grid(images, tmp_path / 'captioned.png', scale=2, caption='what these samples are\nand a second paragraph')
    plain, captioned = (np.asarray(PIL.Image.open(tmp_path / name)) for name in ['plain.png', 'captioned.png'])
    band = captioned.shape[0] - plain.shape[0]
    assert band > 2 * 14 and captioned.shape[1] >= 320, 'two lines of text above; at least 320 pixels wide'
    left = (captioned.shape[1] - plain.shape[1]) // 2
    assert np.array_equal(captioned[band:, left:left + plain.shape[1]], plain), 'the grid itself is unchanged, centred'
    assert (captioned[:band] < 128).any() and (captioned[:band] == 255).mean() > 0.5, 'dark letters on white'


def test_row_labels_go_left_of_the_unchanged_grid(tmp_path):
    images = np.full([6, 4, 4, 3], 128, dtype=np.uint8)
    save_grid(images, tmp_path / 'labelled.png', columns=3, scale=8, gap=1, row_labels=['airplane', 'horse'])
    save_grid(images, tmp_path / 'plain.png', columns=3, scale=8, gap=1)
    labelled, plain = (np.asarray(PIL.Image.open(tmp_path / name)) for name in ['labelled.png', 'plain.png'])
    margin = labelled.shape[1] - plain.shape[1]
    assert labelled.shape[0] == plain.shape[0] and margin > 30, 'a margin wide enough for "airplane"'
    assert np.array_equal(labelled[:, margin:], plain), 'the grid itself unchanged'
    left = labelled[:, :margin]
    dark_rows = np.flatnonzero((left < 100).any(axis=(1, 2)))
    assert dark_rows.size and dark_rows.min() < 40 <= dark_rows.max(), 'text beside the first row and beside the second'
