"""How alike a LoRA layer's composition weights are between conditions, and the heatmaps that show it
(paper Fig. 4, Fig. 7, Appendix B).

A compositional LoRA layer mixes its m bases with weights w(c) that depend on the condition c: a row
of TimeLoRA's table for time step c, or UC-LoRA's MLP output for noise level c. The cosine similarity
of w(c) and w(c') for every pair of conditions shows what the layer does with its bases: a bright
band along the diagonal means near conditions share bases and far ones use others. Two numbers sum
a matrix up: the mean similarity of near pairs and that of far pairs, near and far measured as
fractions of the axis' span (nano diffusion's T = 1000 steps: near <= 50 steps apart, far >= 500).

Shared by tools/figures/composition_maps.py (any upstream's snapshot) and nano diffusion's
nano_metrics.py (its omega_similarity.png).
"""

import collections

import numpy as np
import torch.nn.functional as F

NEAR, FAR = 1 / 20, 1 / 2 # near pairs: 0 < distance <= NEAR * span; far pairs: distance >= FAR * span

Axis = collections.namedtuple('Axis', [
    'values', # [S] the conditions, ascending: time steps, or noise levels sigma
    'label',  # what to write on the axes
    'log',    # plot on a log scale, and measure distances between logs (noise levels span decades)
    'span',   # the whole range near and far are fractions of, in the units distances are measured in
])


def cosine_similarity(weights):
    """[S, m] composition weights, one row a condition -> [S, S] cosine similarity between the rows."""
    unit = F.normalize(weights, dim=1)
    return unit @ unit.T


def near_and_far(similarity, axis):
    """(mean similarity of near pairs, of far pairs) in a [S, S] matrix; None where the axis has no such pair."""
    coordinates = np.log(axis.values) if axis.log else np.asarray(axis.values, dtype=np.float64)
    distance = np.abs(coordinates[:, None] - coordinates[None, :])
    similarity = np.asarray(similarity)
    pairs = [(distance > 0) & (distance <= NEAR * axis.span), distance >= FAR * axis.span]
    return tuple(float(similarity[chosen].mean()) if chosen.any() else None for chosen in pairs)


def cell_edges(axis):
    """S + 1 cell edges around the S >= 2 conditions: halfway between neighbours (between their logs on a log axis)."""
    coordinates = np.log(axis.values) if axis.log else np.asarray(axis.values, dtype=np.float64)
    middles = (coordinates[1:] + coordinates[:-1]) / 2
    edges = np.concatenate([[2 * coordinates[0] - middles[0]], middles, [2 * coordinates[-1] - middles[-1]]])
    return np.exp(edges) if axis.log else edges


def draw(ax, similarity, axis):
    """One heatmap of a [S, S] similarity on `ax`, read as a matrix: the first condition at the top left.
    Returns the image, for a colour bar."""
    edges = cell_edges(axis)
    image = ax.pcolormesh(edges, edges, np.asarray(similarity), vmin=-1, vmax=1, cmap='RdBu_r', rasterized=True)
    if axis.log:
        ax.set_xscale('log')
        ax.set_yscale('log')
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(edges[-1], edges[0])
    ax.set_box_aspect(1)
    ax.set(xlabel=axis.label + "'", ylabel=axis.label)
    return image


def grid_shape(count):
    """(rows, columns) of a grid of `count` small heatmaps: square to a little wider, the fewest cells left empty."""
    narrowest, widest = int(np.ceil(np.sqrt(count))), int(np.ceil(np.sqrt(1.5 * count))) + 1
    columns = min(range(narrowest, widest + 1), key=lambda c: (-count % c, c))
    return -(-count // columns), columns


def draw_layers(fig, spec, layers, names, axis, rows, columns, **spacing):
    """Each layer's [S, S] similarity as a small heatmap titled by its name, in `rows` x `columns` cells of
    the gridspec cell `spec`, in network order; tick labels on the outer edges only. spacing: hspace and
    wspace of the cells, for a figure without a layout engine. Returns the last image."""
    from matplotlib.ticker import MaxNLocator
    grid = spec.subgridspec(rows, columns, **spacing)
    for i, (layer, name) in enumerate(zip(layers, names)):
        row, column = divmod(i, columns)
        ax = fig.add_subplot(grid[row, column])
        image = draw(ax, layer, axis)
        ax.set_title(name, fontsize=7)
        ax.minorticks_off() # a log axis' minor ticks crowd a small map, and cost most of the drawing time
        if not axis.log: # 3 or 4 time steps a side, so that neighbouring maps' labels stay apart
            ax.xaxis.set_major_locator(MaxNLocator(3))
            ax.yaxis.set_major_locator(MaxNLocator(3))
        ax.tick_params(labelsize=6)
        ax.set(xlabel=None, ylabel=None)
        if column > 0:
            ax.tick_params(labelleft=False)
        if i + columns < len(layers): # another heatmap below this one
            ax.tick_params(labelbottom=False)
    return image


def save_heatmap(path, similarity, axis, title):
    """One heatmap with its colour bar and title, as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 5.6), layout='constrained')
    image = draw(ax, similarity, axis)
    fig.colorbar(image, ax=ax, shrink=0.85, label='cosine similarity')
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_layer_grid(path, layers, names, axis, title):
    """Every layer's heatmap, small, on one PNG with a shared colour bar and the axis named once. The layout
    is fixed in inches (matplotlib's layout engines take seconds to place dozens of small maps)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows, columns = grid_shape(len(layers))
    cell, across, down = 1.7, 0.3, 0.35 # a map's side; the gaps between maps (down: room for a map's title)
    left, right, bottom, top = 0.8, 1.3, 0.65, 0.9 # room for tick labels and axis names, the colour bar, the title
    width, height = left + columns * cell + (columns - 1) * across + right, bottom + rows * cell + (rows - 1) * down + top
    fig = plt.figure(figsize=(width, height))
    spec = fig.add_gridspec(1, 1, left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)[0]
    image = draw_layers(fig, spec, layers, names, axis, rows, columns, wspace=across / cell, hspace=down / cell)
    colour_bar = fig.add_axes([1 - (right - 0.3) / width, bottom / height, 0.15 / width, 1 - (bottom + top) / height])
    fig.colorbar(image, cax=colour_bar, label='cosine similarity')
    fig.supxlabel(f"{axis.label}' (columns)", fontsize=9, y=0.15 / height)
    fig.supylabel(f'{axis.label} (rows)', fontsize=9, x=0.15 / width)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va='top')
    fig.savefig(path, dpi=100)
    plt.close(fig)
