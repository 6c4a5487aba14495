"""miniai.plotting: subplots' shapes (as in the course: one panel is an array too), grids, and images on axes."""
import matplotlib
matplotlib.use('Agg')

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

import miniai.datasets
from miniai.plotting import get_grid, show_image, show_images, subplots


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close('all')


def test_subplots_shapes_sizes_and_titles():
    fig, ax = subplots()
    assert isinstance(ax, np.ndarray) and ax.shape == (1,) and isinstance(ax[0], plt.Axes)   # ax[0], as in the course
    assert tuple(fig.get_size_inches()) == (3, 3)
    fig, ax = subplots(1, 3, imsize=2, suptitle='three')
    assert ax.shape == (3,) and tuple(fig.get_size_inches()) == (6, 2) and fig._suptitle.get_text() == 'three'
    assert subplots(2, 3)[1].shape == (2, 3) and subplots(3, 1)[1].shape == (3,)
    assert subplots(squeeze=False)[1].shape == (1, 1)                    # matplotlib's own argument still wins
    fig, _ = subplots(2, 2, figsize=(5, 4))
    assert tuple(fig.get_size_inches()) == (5, 4)


@pytest.mark.parametrize('n,nrows,ncols,shape', [(5, None, None, (2, 3)), (1, None, None, (1, 1)),
                                                 (7, None, 4, (2, 4)), (7, 3, None, (3, 3))])
def test_get_grid_gives_n_visible_axes(n, nrows, ncols, shape):
    fig, axs = get_grid(n, nrows, ncols, title='grid')
    assert axs.shape == (n,) and len(fig.axes) == shape[0]*shape[1]
    assert [ax.axison for ax in fig.axes] == [True]*n + [False]*(len(fig.axes) - n)
    assert fig._suptitle.get_text() == 'grid'


def test_show_image_accepts_tensors_arrays_and_pil_images():
    g = torch.Generator().manual_seed(0)
    chw = torch.rand(1, 5, 4, generator=g)
    ax = show_image(chw, title='one channel')
    assert np.array_equal(ax.images[0].get_array(), chw[0].numpy()) and ax.images[0].get_cmap().name == 'gray'
    assert ax.get_title() == 'one channel' and not ax.axison
    rgb = torch.rand(3, 5, 4, generator=g)                               # channels first -> last
    assert np.array_equal(show_image(rgb).images[0].get_array(), rgb.permute(1, 2, 0).numpy())
    pil = Image.fromarray(np.arange(20, dtype=np.uint8).reshape(4, 5))
    _, axs = subplots(1, 2)
    assert show_image(pil, ax=axs[1], noframe=False) is axs[1] and axs[1].axison
    assert np.array_equal(axs[1].images[0].get_array(), np.asarray(pil))


def test_show_images_titles_each_picture_and_is_importable_from_datasets():
    ims = [torch.full((1, 4, 5), i/4) for i in range(3)]
    axs = show_images(ims, titles=['a', 'b', 'c'], imsize=1)
    assert [ax.get_title() for ax in axs] == ['a', 'b', 'c']
    assert [float(ax.images[0].get_array().mean()) for ax in axs] == [0., 0.25, 0.5]
    assert (miniai.datasets.show_image, miniai.datasets.subplots, miniai.datasets.get_grid,
            miniai.datasets.show_images) == (show_image, subplots, get_grid, show_images)
