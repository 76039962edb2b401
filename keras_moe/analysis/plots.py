"""matplotlib figures of gate and routing statistics.

Each function returns the figure and, given `path`, also saves it as PNG.
matplotlib is needed: `pip install "keras-moe[plot]"`.
"""

import numpy as np


def _pyplot():
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'Plots need matplotlib: `pip install "keras-moe[plot]"`.'
        ) from error
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path):
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    if path is not None:
        # The bounding box of what is drawn: titles and legends outside
        # the axes are not cut off.
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_gate_density(stats, path=None):
    """Bar chart of the fraction of active gates of each gated layer.

    Args:
        stats: a `GateStatistics`.
        path: optional PNG path to save to.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    n = len(stats.layer_names)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * n + 2), 3.5))
    ax.bar(range(n), stats.density, color="tab:blue", label="active")
    ax.bar(
        range(n),
        stats.dead_fraction,
        color="tab:red",
        alpha=0.6,
        label="dead channels",
    )
    ax.set_xticks(range(n))
    ax.set_xticklabels(stats.layer_names, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of gates")
    ax.set_title(
        f"gate density per layer (overall {stats.overall_density:.2f})"
    )
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_gate_histograms(stats, path=None, max_layers=16):
    """Histograms of gate values, one panel per gated layer.

    Args:
        stats: a `GateStatistics`.
        path: optional PNG path to save to.
        max_layers: at most this many layers, evenly spread over depth.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    layers = np.unique(
        np.linspace(0, len(stats.layer_names) - 1, max_layers).astype(int)
    )
    cols = min(4, len(layers))
    rows = int(np.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows))
    axes = np.atleast_1d(axes).ravel()
    for ax, i in zip(axes, layers):
        counts, edges = stats.histograms[i]
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")
        ax.set_title(stats.layer_names[i], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(layers) :]:
        ax.axis("off")
    return _finish(fig, path)


def plot_class_gate_patterns(stats, layer=-1, path=None, class_names=None):
    """Heat map of the mean gate of every channel for every class.

    Args:
        stats: a `GateStatistics` computed with labels.
        layer: index of the gated layer to show.
        path: optional PNG path to save to.
        class_names: optional names for the rows.

    Returns:
        The matplotlib figure.
    """
    if stats.class_patterns is None:
        raise ValueError(
            "`stats` has no class patterns: compute it with labels."
        )
    plt = _pyplot()
    pattern = stats.class_patterns[layer]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.25 * len(pattern) + 1)))
    image = ax.imshow(pattern, aspect="auto", cmap="viridis")
    ax.set_xlabel("channel (expert)")
    ax.set_ylabel("class")
    names = class_names or [str(c) for c in stats.classes]
    if len(names) <= 40:
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
    ax.set_title(f"mean gate per class, {stats.layer_names[layer]}")
    fig.colorbar(image, ax=ax, label="mean gate")
    return _finish(fig, path)


def plot_expert_load(load, path=None, title="expert load"):
    """Bar chart of the mean gate and top-choice share of each expert.

    Args:
        load: the dict returned by `expert_load`.
        path: optional PNG path to save to.
        title: figure title.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    n = len(load["mean_gate"])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), 3))
    width = 0.4
    ax.bar(
        np.arange(n) - width / 2, load["mean_gate"], width, label="mean gate"
    )
    ax.bar(
        np.arange(n) + width / 2,
        load["top_fraction"],
        width,
        label="largest gate",
    )
    ax.axhline(
        1.0 / n, color="gray", linestyle="--", linewidth=1, label="uniform"
    )
    ax.set_xlabel("expert")
    ax.set_xticks(range(n))
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_selection_frequency(stats, path=None):
    """How often each expert selects each patch position (pMoE).

    Args:
        stats: a `PatchRoutingStatistics`.
        path: optional PNG path to save to.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    frequency = stats.selection_frequency
    k = len(frequency)
    cols = min(k, 8)
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows))
    axes = np.atleast_1d(axes).ravel()
    for s, ax in enumerate(axes):
        if s >= k:
            ax.axis("off")
            continue
        ax.imshow(frequency[s], vmin=0, vmax=1, cmap="magma")
        ax.set_title(f"expert {s}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"selection frequency (coverage {stats.coverage:.2f})")
    return _finish(fig, path)


def plot_patch_selection(image, indices, grid_shape, path=None, title=None):
    """The patches each expert selected, one panel per expert.

    Each panel shows the input image with the expert's patches outlined and
    the other patches dimmed, so that patches several experts picked stay
    readable.

    Args:
        image: `(height, width)` or `(height, width, channels)` image in
            [0, 1] or [0, 255].
        indices: `(num_experts, patches_per_expert)` selected patch indices
            of this image (row-major over the patch grid), for example
            `layer.route(features)["indices"][i]`.
        grid_shape: `(grid_h, grid_w)`, the patch grid; the image is cut
            into this many equal cells, so the patches are drawn at image
            scale even when routing ran on a smaller feature map.
        path: optional PNG path to save to.
        title: optional figure title.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    image = np.asarray(image, dtype="float64")
    if image.max() > 1.0:
        image = image / 255.0
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    height, width = image.shape[:2]
    grid_h, grid_w = grid_shape
    cell_h, cell_w = height / grid_h, width / grid_w
    # The patch of every pixel, row-major over the grid.
    patch_of = (np.arange(height) * grid_h // height)[:, None] * grid_w + (
        np.arange(width) * grid_w // width
    )[None, :]
    indices = np.asarray(indices).reshape(len(indices), -1)
    colors = plt.get_cmap("tab10")
    cols = min(len(indices), 4)
    rows = int(np.ceil(len(indices) / cols))
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(2.2 * cols, 2.3 * rows + (0.4 if title else 0.0)),
        squeeze=False,
        layout="constrained",
    )
    axes = axes.ravel()
    for s, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if s >= len(indices):
            ax.axis("off")
            continue
        selected = np.isin(patch_of, indices[s])
        if image.ndim == 3:
            selected = selected[..., None]
        ax.imshow(
            image * np.where(selected, 1.0, 0.3),
            cmap="gray" if image.ndim == 2 else None,
            vmin=0.0,
            vmax=1.0,
        )
        for j in indices[s]:
            row, col = divmod(int(j), grid_w)
            ax.add_patch(
                Rectangle(
                    (col * cell_w - 0.5, row * cell_h - 0.5),
                    cell_w,
                    cell_h,
                    fill=False,
                    edgecolor=colors(s % 10),
                    linewidth=1.5,
                )
            )
        ax.set_title(f"expert {s}", fontsize=9, color=colors(s % 10))
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)
