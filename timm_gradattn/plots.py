"""PNG figures for runs and evaluations: training curves, reliability diagram, confusion matrix,
per-layer gradient norms across training, attention routing over the extraction points (GradAttn) or
over earlier outputs (Attention Shortcuts), spatial attention drawn over images (CNNtention), and
Grad-CAM maps over images, for one model or the same images across models.

Figures are drawn on ``matplotlib.figure.Figure`` objects and rendered by the Agg canvas, never through
pyplot, so nothing here touches a user's interactive backend or leaks open figures. Every function
takes plain data (lists, tensors or the records the analysis returns) and a path, writes one PNG and
returns the path.
"""
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from .analysis import REFERENCE_BAND, DepthRoutingSummary, RoutingSummary, SpatialAttention
from .metrics import ReliabilityBins
from .reporting import read_summary_csv

__all__ = ['plot_cam', 'plot_cam_grid', 'plot_confusion_matrix', 'plot_depth_routing', 'plot_gradient_norms',
           'plot_reliability_diagram', 'plot_routing', 'plot_spatial_attention', 'plot_training_curves',
           'read_summary_csv']

PathLike = Union[str, Path]
_DPI = 120
_TRAIN_COLOR, _VAL_COLOR, _TEST_COLOR = '#1f77b4', '#d62728', '#7f7f7f'


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout='constrained')
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, facecolor='white')
    return path


def _short(label: str, width: int = 18) -> str:
    return label if len(label) <= width else label[:width - 1] + '\u2026'


# --- training curves -----------------------------------------------------------------------------------------

def plot_training_curves(
        summary: Union[PathLike, Sequence[Dict[str, float]]],
        path: PathLike,
        title: Optional[str] = None,
) -> Path:
    """Accuracy, loss and learning rate per epoch from ``summary.csv`` (or its rows).

    The epoch with the best validation accuracy (the one early stopping restores) is marked. A run without a
    validation split has no validation curve; the test columns of ``--test-every-epoch`` are drawn dashed, as a
    curve that selected nothing.
    """
    rows = read_summary_csv(summary) if isinstance(summary, (str, Path)) else list(summary)
    if not rows:
        raise ValueError('No epochs to plot.')
    column = lambda key: np.array([row.get(key, math.nan) for row in rows], dtype=float)
    epochs = column('epoch')
    val_top1 = column('val_top1')
    best = int(np.nanargmax(val_top1)) if np.isfinite(val_top1).any() else None

    fig = _new_figure(13, 3.8)
    ax_acc, ax_loss, ax_lr = fig.subplots(1, 3)
    for ax, key, label in ((ax_acc, 'top1', 'top-1 accuracy (%)'), (ax_loss, 'loss', 'cross-entropy loss')):
        ax.plot(epochs, column(f'train_{key}'), '-o', ms=3, color=_TRAIN_COLOR, label='train')
        for split, style, color, name in (('val', '-o', _VAL_COLOR, 'validation'),
                                          ('test', '--s', _TEST_COLOR, 'test (not used for selection)')):
            values = column(f'{split}_{key}')
            if np.isfinite(values).any():
                ax.plot(epochs, values, style, ms=3, color=color, label=name)
        ax.set_xlabel('epoch')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if best is not None:
            ax.axvline(epochs[best], color='grey', ls='--', lw=1)
    if best is not None:
        gap = abs(column('train_top1')[best] - val_top1[best])
        ax_acc.annotate(
            f'best val {val_top1[best]:.2f}%\nepoch {epochs[best]:g}, train-val gap {gap:.2f}',
            xy=(epochs[best], val_top1[best]), xytext=(0.97, 0.05), textcoords='axes fraction',
            ha='right', va='bottom', fontsize=8, arrowprops=dict(arrowstyle='->', color='grey'))
    ax_acc.legend(loc='upper left', fontsize=8)
    ax_acc.set_title('accuracy')
    ax_loss.set_title('loss')
    lr = column('lr')
    ax_lr.plot(epochs, lr, '-o', ms=3, color='#2ca02c')
    if np.nanmin(lr) > 0:
        ax_lr.set_yscale('log')
    ax_lr.set_xlabel('epoch')
    ax_lr.set_ylabel('learning rate')
    ax_lr.set_title('learning rate')
    ax_lr.grid(alpha=0.3, which='both')
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --- calibration and confusion -------------------------------------------------------------------------------

def plot_reliability_diagram(bins: ReliabilityBins, path: PathLike, title: Optional[str] = None) -> Path:
    """Accuracy against confidence per bin, the gap to the diagonal shaded, and the share of samples per bin."""
    edges = np.array(bins.edges)
    centers = (edges[:-1] + edges[1:]) / 2
    width = np.diff(edges)
    count = np.array(bins.count, dtype=float)
    accuracy = np.array(bins.accuracy)
    confidence = np.array(bins.confidence)
    filled = count > 0

    fig = _new_figure(5.2, 6.0)
    ax, ax_count = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax.bar(centers[filled], accuracy[filled], width[filled], color=_TRAIN_COLOR, edgecolor='white',
           label='accuracy in bin')
    # The gap between what the model claims (mean confidence) and what it achieves, per bin.
    ax.bar(centers[filled], confidence[filled] - accuracy[filled], width[filled] * 0.9, bottom=accuracy[filled],
           color=_VAL_COLOR, alpha=0.35, edgecolor=_VAL_COLOR, hatch='//', label='gap to mean confidence')
    ax.plot([0, 1], [0, 1], '--', color='black', lw=1, label='perfect calibration')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel('accuracy')
    ax.legend(loc='upper left', fontsize=8)
    ax.text(0.97, 0.05, f'ECE = {bins.ece:.4f}\nn = {int(count.sum())}', transform=ax.transAxes,
            ha='right', va='bottom', fontsize=9, bbox=dict(facecolor='white', edgecolor='lightgrey'))
    ax.set_title(title or 'reliability diagram')
    ax.grid(alpha=0.3)
    share = count / max(count.sum(), 1)
    ax_count.bar(centers, share, width, color='grey', edgecolor='white')
    ax_count.set_xlabel('confidence (top-1 softmax probability)')
    ax_count.set_ylabel('share of\nsamples')
    ax_count.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion_matrix(
        counts: Any,
        path: PathLike,
        label_names: Optional[Sequence[str]] = None,
        title: Optional[str] = None,
) -> Path:
    """Confusion matrix coloured by the share of each true class (rows), annotated with counts."""
    counts = np.asarray(counts, dtype=np.int64)
    num_classes = counts.shape[0]
    label_names = list(label_names) if label_names is not None else [str(i) for i in range(num_classes)]
    if len(label_names) != num_classes:
        raise ValueError(f'{len(label_names)} label names for a {num_classes}-class confusion matrix.')
    row_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(4.5, 0.45 * num_classes + 2.5), 24)
    fig = _new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(row_share, cmap='Blues', norm=Normalize(0, 1))
    fig.colorbar(image, ax=ax, shrink=0.8, label='share of true class')
    if num_classes <= 30:
        ticks = np.arange(num_classes)
        short = [_short(name) for name in label_names]
        ax.set_xticks(ticks, short, rotation=45 if max(map(len, short)) > 2 else 0, ha='right', fontsize=8)
        ax.set_yticks(ticks, short, fontsize=8)
        for true_class in range(num_classes):
            for predicted in range(num_classes):
                value = counts[true_class, predicted]
                if value:
                    dark = row_share[true_class, predicted] > 0.5
                    ax.text(predicted, true_class, str(value), ha='center', va='center',
                            fontsize=7 if num_classes > 12 else 9, color='white' if dark else 'black')
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(title or f'confusion matrix (top-1 {100 * accuracy:.2f}%, n = {counts.sum()})')
    return _save(fig, path)


# --- gradient flow -------------------------------------------------------------------------------------------

def plot_gradient_norms(
        records: Sequence[Dict[str, Any]],
        path: PathLike,
        band: Optional[Tuple[float, float]] = REFERENCE_BAND,
        title: Optional[str] = None,
) -> Path:
    """Per-layer gradient norm (log scale) against depth, one line per recorded epoch.

    ``records`` are the lines of ``grad_norms.jsonl`` (``{'epoch': e, 'norms': {layer: norm}}``). Layers
    are placed in network order; a layer missing from a record (no gradient that time) leaves a gap.
    The shaded band is the healthy range of the Gradient Health Score.
    """
    if not records:
        raise ValueError('No gradient-norm records to plot.')
    layers: List[str] = []
    for record in records:
        layers.extend(name for name in record['norms'] if name not in layers)
    depth = np.arange(len(layers))
    epochs = [record.get('epoch', index) for index, record in enumerate(records)]
    # Colour by epoch when epochs are numbers, else by record order.
    numeric = all(isinstance(e, (int, float)) for e in epochs)
    shade = [float(e) for e in epochs] if numeric else list(range(len(epochs)))
    norm = Normalize(min(shade), max(shade)) if max(shade) > min(shade) else Normalize(shade[0] - 1, shade[0] + 1)
    cmap = colormaps['viridis']

    fig = _new_figure(min(max(8, 0.16 * len(layers) + 3), 22), 5.8)
    ax = fig.subplots()
    table = np.array([[record['norms'].get(name, math.nan) for name in layers] for record in records], dtype=float)
    positive = table[np.isfinite(table) & (table > 0)]
    lowest = positive.min() if positive.size else 1e-8
    highest = positive.max() if positive.size else 1.0
    band_patch = None
    if band is not None:
        band_patch = ax.axhspan(
            band[0], band[1], color='#2ca02c', alpha=0.08, label=f'healthy band [{band[0]:g}, {band[1]:g}]')
        lowest, highest = min(lowest, band[0]), max(highest, band[1])
    floor = lowest / 3
    for values, epoch, position in zip(table, epochs, shade):
        color = cmap(norm(position))
        ax.plot(depth, np.where(values > 0, values, np.nan), '-o', ms=2.5, lw=1.2, color=color,
                label=f'epoch {epoch}' if numeric else str(epoch))
        # A zero gradient has no place on a log axis: mark it on the bottom edge.
        zero = values == 0
        if zero.any():
            ax.plot(depth[zero], np.full(zero.sum(), floor), 'v', ms=5, color=color, clip_on=False)
    ax.set_yscale('log')
    ax.set_ylim(floor / 2, highest * 3)
    step = max(1, math.ceil(len(layers) / 90))
    ax.set_xticks(depth[::step], [layers[i] for i in depth[::step]], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_ylabel('mean gradient norm')
    ax.set_xlabel('layer (input to output)')
    ax.grid(alpha=0.3, which='major')
    if len(records) > 1 and numeric:
        # Many epochs read better as a colour scale than as a legend.
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label='epoch', pad=0.01)
        if band_patch is not None:
            ax.legend(handles=[band_patch], loc='upper right', fontsize=8)
    else:
        ax.legend(loc='upper right', fontsize=8)
    ax.set_title(title or 'per-layer gradient norm across training')
    return _save(fig, path)


# --- attention routing ---------------------------------------------------------------------------------------

def plot_routing(
        summaries: Union[RoutingSummary, Sequence[RoutingSummary]],
        path: PathLike,
        title: Optional[str] = None,
) -> Path:
    """Share of each extraction point in the prediction: bars over the data set, heatmaps per class.

    One bar group per extraction point (one bar per method); one heatmap (class x extraction point)
    per method, coloured by the mean routing weight of the samples of that true class.
    """
    if isinstance(summaries, RoutingSummary):
        summaries = [summaries]
    summaries = list(summaries)
    if not summaries:
        raise ValueError('No routing summaries to plot.')
    points = summaries[0].points
    num_classes = len(summaries[0].per_class)
    label_names = summaries[0].label_names or [str(i) for i in range(num_classes)]
    height = min(max(4.0, 0.28 * num_classes + 1.8), 16)
    fig = _new_figure(4.5 + 3.6 * len(summaries), height)
    axes = fig.subplots(1, 1 + len(summaries), width_ratios=[1.3] + [1] * len(summaries))
    ax_bar, heat_axes = axes[0], axes[1:]

    x = np.arange(len(points))
    bar_width = 0.8 / len(summaries)
    colors = ['#1f77b4', '#ff7f0e', '#2ca02c', '#9467bd']
    for index, summary in enumerate(summaries):
        offset = (index - (len(summaries) - 1) / 2) * bar_width
        bars = ax_bar.bar(x + offset, summary.overall, bar_width, color=colors[index % len(colors)],
                          label=summary.method)
        ax_bar.bar_label(bars, fmt='%.2f', fontsize=7, padding=1)
    ax_bar.axhline(1 / len(points), color='grey', ls=':', lw=1, label='uniform')
    ax_bar.set_xticks(x, points)
    ax_bar.set_ylabel('share of the prediction')
    ax_bar.set_title(f'over the data set (n = {sum(summaries[0].class_counts)})')
    ax_bar.legend(fontsize=8)
    ax_bar.grid(alpha=0.3, axis='y')
    ax_bar.set_ylim(0, max(max(s.overall) for s in summaries) * 1.2)

    for ax, summary in zip(heat_axes, summaries):
        per_class = np.array(summary.per_class, dtype=float)
        empty = np.array(summary.class_counts) == 0
        per_class[empty] = np.nan
        image = ax.imshow(per_class, cmap='magma', aspect='auto', vmin=0, vmax=np.nanmax(per_class))
        fig.colorbar(image, ax=ax, shrink=0.9, label='mean weight')
        ax.set_xticks(x, points, rotation=45, ha='right')
        if num_classes <= 40:
            ax.set_yticks(np.arange(num_classes), [_short(name, 22) for name in label_names], fontsize=7)
            if num_classes <= 15:
                for row in range(num_classes):
                    for col in range(len(points)):
                        if np.isfinite(per_class[row, col]):
                            value = per_class[row, col]
                            ax.text(col, row, f'{value:.2f}', ha='center', va='center', fontsize=7,
                                    color='black' if value > 0.6 * np.nanmax(per_class) else 'white')
        for row in np.flatnonzero(empty) if num_classes <= 40 else ():
            ax.text((len(points) - 1) / 2, row, 'no samples', ha='center', va='center', fontsize=7, color='grey')
        ax.set_ylabel('true class')
        ax.set_title(f'per true class: {summary.method}')
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_depth_routing(summary: DepthRoutingSummary, path: PathLike, title: Optional[str] = None) -> Path:
    """Which earlier outputs each block reads: a (reader x stored output) heatmap of mean softmax weights.

    Row l covers the outputs stored when step l attends (the lower triangle, diagonal included: the
    diagonal is the newest output, the one a residual connection would pass on); cells beyond are blank.
    Cells are annotated with the weight and coloured by the weight over the uniform one (1 / outputs read),
    so rows of different lengths compare: red reads more than an even share, blue less.
    """
    readers, memory = summary.readers, summary.memory
    if not readers:
        raise ValueError('No attention steps to plot.')
    table = np.full((len(readers), len(memory)), np.nan)
    for row, weights in enumerate(summary.weights):
        table[row, :len(weights)] = np.asarray(weights, dtype=float) * len(weights)
    side = min(max(4.5, 0.42 * len(memory) + 2.5), 16)
    fig = _new_figure(side + 1.4, side)
    ax = fig.subplots()
    image = ax.imshow(table, cmap='RdBu_r', norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(np.nanmax(table), 2.0)))
    fig.colorbar(image, ax=ax, shrink=0.8, label='mean weight / uniform weight (1 = an even share)')
    ax.set_xticks(np.arange(len(memory)), memory, rotation=45, ha='right', fontsize=8)
    ax.set_yticks(np.arange(len(readers)), readers, fontsize=8)
    if len(readers) <= 20:
        for row, weights in enumerate(summary.weights):
            for col, value in enumerate(weights):
                extreme = not 0.4 < table[row, col] < 2.5
                ax.text(col, row, f'{value:.2f}', ha='center', va='center', fontsize=6 if len(readers) > 8 else 8,
                        color='white' if extreme else 'black')
    ax.set_xlabel('stored output read (oldest first)')
    ax.set_ylabel('attention forming the input of')
    ax.set_title(title or f'depth-attention routing (n = {summary.num_samples} images)')
    return _save(fig, path)


def _displayable(image: Any, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> np.ndarray:
    """A (C, H, W) normalised tensor as an (H, W[, 3]) array in [0, 1] for imshow."""
    image = np.asarray(image, dtype=float)
    if mean is not None and std is not None:
        image = image * np.asarray(std, dtype=float)[:, None, None] + np.asarray(mean, dtype=float)[:, None, None]
    image = np.clip(image, 0, 1)
    return image[0] if image.shape[0] == 1 else image[:3].transpose(1, 2, 0)


def _overlay(shown: np.ndarray, values: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    """``values`` (h, w) coloured from 0 to their maximum, stretched over ``shown`` (H, W[, 3]) and blended, RGB."""
    height, width = shown.shape[:2]
    rows = np.arange(height) * values.shape[0] // height
    cols = np.arange(width) * values.shape[1] // width
    heat = colormaps['inferno'](values / max(values.max(), 1e-12))[..., :3][rows][:, cols]
    base = np.repeat(shown[..., None], 3, axis=-1) if shown.ndim == 2 else shown
    return (1 - alpha) * base + alpha * heat


def plot_spatial_attention(
        attention: SpatialAttention,
        images: Any,
        path: PathLike,
        labels: Optional[Sequence[str]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        title: Optional[str] = None,
) -> Path:
    """Each stage's attention drawn over each image: from the centre position (marked +), and received.

    One row per image; each map is stretched over the whole image (one cell per stage position) and
    coloured from 0 to its own maximum, so the pattern shows at every stage; the column title gives the
    stage's grid. ``mean``/``std`` undo the input normalisation for display.
    """
    images = np.asarray(images, dtype=float)
    num_images, num_stages = images.shape[0], len(attention.centre)
    maps_of = attention.centre[0].shape[0] if num_stages else 0
    if num_stages == 0 or maps_of != num_images:
        raise ValueError(f'{num_images} images for the attention maps of {maps_of}: '
                         f'pass the images they were read from.')
    labels = list(labels) if labels is not None else [''] * num_images
    height, width = images.shape[-2:]
    gap = max(1, height // 16)
    shown = [np.repeat(im[..., None], 3, axis=-1) if im.ndim == 2 else im
             for im in (_displayable(image, mean, std) for image in images)]

    def strip(panels: List[np.ndarray]) -> np.ndarray:
        # Panels stacked top to bottom with a white gap: one image per column instead of one axes per panel.
        white = np.ones((gap, width, 3))
        return np.concatenate([part for panel in panels for part in (panel, white)][:-1])

    columns = [('image', strip(shown), None)]
    for what, maps in (('centre', attention.centre), ('received', attention.received)):
        for stage, stage_maps in enumerate(maps):
            values = [np.asarray(m, dtype=float) for m in stage_maps]
            grid = values[0].shape
            columns.append((f'stage {stage + 1} {what}\n{grid[0]}x{grid[1]}',
                            strip([_overlay(base, v) for base, v in zip(shown, values)]),
                            attention.centre_positions[stage] + grid if what == 'centre' else None))
    panel_width = 1.35  # inches per column; the height follows the images' aspect
    fig = _new_figure(panel_width * len(columns) + 0.4,
                      panel_width * (num_images * (height + gap) - gap) / width + 0.8)
    axes = fig.subplots(1, len(columns))
    offsets = np.arange(num_images) * (height + gap)
    for ax, (name, picture, centre) in zip(axes, columns):
        ax.imshow(np.clip(picture, 0, 1), interpolation='nearest')
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if centre is not None:
            grid_row, grid_col, grid_h, grid_w = centre
            ax.plot(np.full(num_images, (grid_col + 0.5) * width / grid_w - 0.5),
                    offsets + (grid_row + 0.5) * height / grid_h - 0.5, '+', ms=7, mew=1.5, color='#00e5ff')
    axes[0].set_yticks(offsets + (height - 1) / 2, [_short(label, 12) for label in labels], fontsize=8)
    fig.suptitle(title or 'spatial attention (mean over heads): from the centre (+) and received on average',
                 fontsize=10)
    return _save(fig, path)


# --- Grad-CAM --------------------------------------------------------------------------------------------------

def plot_cam_grid(
        images: Any,
        maps_by_model: Dict[str, Any],
        path: PathLike,
        labels: Optional[Sequence[str]] = None,
        predictions_by_model: Optional[Dict[str, Sequence[str]]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        columns: int = 8,
        title: Optional[str] = None,
) -> Path:
    """The same images across models: the images, titled with ``labels`` (the true classes), then a row per model of
    its Grad-CAM maps over them, titled with its predictions (red where wrong). ``images`` (N, C, H, W) are in [0, 1]
    or normalised with ``mean``/``std``; maps (N, h, w) are stretched over them and coloured from 0 to each map's
    maximum. More than ``columns`` images wrap into further blocks of rows."""
    images = np.asarray(images, dtype=float)
    if images.ndim != 4 or not maps_by_model:
        raise ValueError(f'Pass images shaped (N, C, H, W) and maps of one model or more; got images of shape '
                         f'{images.shape} and {len(maps_by_model)} models.')
    num_images = images.shape[0]
    maps_by_model = {name: np.asarray(maps, dtype=float) for name, maps in maps_by_model.items()}
    predictions_by_model = predictions_by_model or {}
    for name, maps in maps_by_model.items():
        if maps.ndim != 3 or maps.shape[0] != num_images:
            raise ValueError(f'{name}: maps of shape {maps.shape} for {num_images} images; pass one map per image.')
        if name in predictions_by_model and len(predictions_by_model[name]) != num_images:
            raise ValueError(f'{name}: {len(predictions_by_model[name])} predictions for {num_images} images.')
    if labels is not None and len(labels) != num_images:
        raise ValueError(f'{len(labels)} labels for {num_images} images.')
    shown = [np.dstack([im] * 3) if im.ndim == 2 else im for im in (_displayable(i, mean, std) for i in images)]

    columns = max(1, min(columns, num_images))
    blocks = math.ceil(num_images / columns)
    rows_per_block = 1 + len(maps_by_model)
    panel = 1.15  # inches per image
    fig = _new_figure(max(panel * columns + 1.6, 4.5), panel * 1.18 * blocks * rows_per_block + 0.8)
    axes = fig.subplots(blocks * rows_per_block, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for index in range(num_images):
        block, column = divmod(index, columns)
        rows = axes[block * rows_per_block:(block + 1) * rows_per_block, column]
        truth = labels[index] if labels is not None else None
        rows[0].imshow(shown[index], interpolation='nearest')
        rows[0].set_title(_short(truth, 14) if truth is not None else f'#{index}', fontsize=7)
        for ax, (name, maps) in zip(rows[1:], maps_by_model.items()):
            ax.imshow(np.clip(_overlay(shown[index], maps[index], alpha=0.5), 0, 1), interpolation='nearest')
            predicted = predictions_by_model.get(name)
            if predicted is not None:
                wrong = truth is not None and predicted[index] != truth
                ax.set_title(_short(str(predicted[index]), 14), fontsize=7, color=_VAL_COLOR if wrong else 'black')
    # Row names in the first column, where set_axis_off would hide a y-label.
    for block in range(blocks):
        for offset, name in enumerate(['image'] + list(maps_by_model)):
            ax = axes[block * rows_per_block + offset, 0]
            ax.text(-0.08, 0.5, _short(name, 22), transform=ax.transAxes, ha='right', va='center', fontsize=8)
    fig.colorbar(ScalarMappable(Normalize(0, 1), 'inferno'), ax=axes, shrink=0.6, pad=0.01, label='Grad-CAM / maximum')
    fig.suptitle(title or 'Grad-CAM: true class above each image, prediction above each map (red: wrong)',
                 fontsize=10, wrap=True)
    return _save(fig, path)


def plot_cam(images: Any, maps: Any, path: PathLike, labels: Optional[Sequence[str]] = None,
             predictions: Optional[Sequence[str]] = None, **kwargs: Any) -> Path:
    """One model's Grad-CAM maps (N, h, w) under its images: ``plot_cam_grid`` (and its keywords: ``mean``, ``std``,
    ``columns``, ``title``) with one row of maps."""
    return plot_cam_grid(images, {'Grad-CAM': maps}, path, labels=labels, **kwargs,
                         predictions_by_model=None if predictions is None else {'Grad-CAM': predictions})
