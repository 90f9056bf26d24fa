"""Every plot writes a PNG from the files and records the rest of the project produces."""
import csv
import json

import pytest
import torch
from PIL import Image

from timm_gradattn.analysis import DepthRoutingSummary, RoutingSummary, SpatialAttention, read_grad_norms
from timm_gradattn.metrics import confusion_matrix, reliability_bins
from timm_gradattn.plots import (
    plot_confusion_matrix, plot_depth_routing, plot_gradient_norms, plot_reliability_diagram, plot_routing,
    plot_spatial_attention, plot_training_curves, read_summary_csv,
)


def _assert_png(path, min_side=300):
    with Image.open(path) as image:
        assert image.format == 'PNG'
        assert min(image.size) >= min_side
        # Not a blank canvas: a drawn figure has many distinct colours.
        assert len(image.convert('RGB').getcolors(maxcolors=1 << 20) or []) > 20


def test_training_curves_from_summary_csv(tmp_path):
    fields = ['epoch', 'train_loss', 'train_top1', 'val_loss', 'val_top1', 'lr', 'epoch_time_s']
    path = tmp_path / 'summary.csv'
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for epoch in range(1, 9):
            writer.writerow(dict(epoch=epoch, train_loss=2 / epoch, train_top1=50 + 5 * epoch, val_loss=2.2 / epoch,
                                 val_top1=45 + 4 * epoch - (epoch > 6) * 6, lr=1e-3 * 0.2 ** (epoch // 4),
                                 epoch_time_s=1.5))
    rows = read_summary_csv(path)
    assert rows[0]['epoch'] == 1.0 and len(rows) == 8
    _assert_png(plot_training_curves(path, tmp_path / 'curves.png', title='digits'))


def test_reliability_and_confusion_matrix(tmp_path):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 10, generator=generator) * 3
    targets = torch.randint(0, 10, (300,), generator=generator)
    bins = reliability_bins(logits.softmax(dim=1), targets)
    _assert_png(plot_reliability_diagram(bins, tmp_path / 'reliability.png'))
    names = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
    _assert_png(plot_confusion_matrix(confusion_matrix(logits, targets), tmp_path / 'cm.png', names))
    with pytest.raises(ValueError, match='3 label names for a 10-class'):
        plot_confusion_matrix(confusion_matrix(logits, targets), tmp_path / 'bad.png', names[:3])


def test_gradient_norms_from_jsonl(tmp_path):
    path = tmp_path / 'grad_norms.jsonl'
    layers = ['stem.conv', 'stages.0.0.conv1', 'token_proj.0', 'encoder.0.qkv', 'head']
    with open(path, 'w') as f:
        for epoch in (1, 5, 10):
            norms = {name: 10.0 ** (-depth - epoch / 5) for depth, name in enumerate(layers)}
            norms['head'] = 0.0 if epoch == 10 else norms['head']  # drawn on the bottom edge
            f.write(json.dumps(dict(epoch=epoch, norms=norms)) + '\n')
    records = read_grad_norms(path)
    assert [r['epoch'] for r in records] == [1, 5, 10]
    _assert_png(plot_gradient_norms(records, tmp_path / 'grad_norms.png'))
    _assert_png(plot_gradient_norms(records[:1], tmp_path / 'one.png', band=None))


def test_routing_plot(tmp_path):
    points = ['stem', 'stage1', 'stage2', 'stage3', 'stage4']
    summaries = [
        RoutingSummary(method=method, points=points, overall=[0.1, 0.1, 0.2, 0.3, 0.3],
                       per_class=[[0.1, 0.1, 0.2, 0.3, 0.3], [0.3, 0.2, 0.2, 0.2, 0.1], [0.0] * 5],
                       class_counts=[5, 4, 0], label_names=['cat', 'dog', 'bird'])
        for method in ('rollout', 'gradient')]
    _assert_png(plot_routing(summaries, tmp_path / 'routing.png', title='routing'))
    _assert_png(plot_routing(summaries[0], tmp_path / 'routing_one.png'))


def test_depth_routing_plot(tmp_path):
    readers = ['block1.1', 'block1.2', 'block2.1', 'block2.2']
    weights = [[1.0], [0.3, 0.7], [0.1, 0.2, 0.7], [0.25, 0.25, 0.25, 0.25]]
    summary = DepthRoutingSummary(readers=readers, memory=['stem'] + readers[:-1], weights=weights, num_samples=8)
    _assert_png(plot_depth_routing(summary, tmp_path / 'depth_routing.png'))


@pytest.mark.parametrize('chans', [1, 3])
def test_spatial_attention_plot(tmp_path, chans):
    generator = torch.Generator().manual_seed(0)
    grids = [(28, 32), (14, 16), (7, 8)]
    maps = [torch.rand(3, h, w, generator=generator) for h, w in grids]
    attention = SpatialAttention(centre=[m / m.sum(dim=(1, 2), keepdim=True) for m in maps],
                                 received=[m.flip(1) / m.sum(dim=(1, 2), keepdim=True) for m in maps],
                                 centre_positions=[(h // 2, w // 2) for h, w in grids], entropy=[0.9, 0.5, 0.2])
    images = torch.randn(3, chans, 28, 32, generator=generator)
    path = plot_spatial_attention(attention, images, tmp_path / 'attention_maps.png', labels=['cat', 'dog', 'bird'],
                                  mean=[0.5] * chans, std=[0.25] * chans)
    _assert_png(path)
    with pytest.raises(ValueError, match='2 images for the attention maps of 3'):
        plot_spatial_attention(attention, images[:2], tmp_path / 'bad.png')


def test_training_curves_without_validation_draw_the_test_curve(tmp_path, monkeypatch):
    # A run without a validation split, with --test-every-epoch: no validation line and no best-epoch marker, and the
    # test columns drawn dashed as the curve that selected nothing.
    import timm_gradattn.plots as plots
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, '_save', lambda fig, path: figures.append(fig) or save(fig, path))
    rows = [dict(epoch=epoch, train_loss=2 / epoch, train_top1=50 + 5 * epoch, test_loss=2.2 / epoch,
                 test_top1=45 + 4 * epoch, lr=1e-3, epoch_time_s=1.5) for epoch in range(1, 6)]
    _assert_png(plot_training_curves(rows, tmp_path / 'curves.png'))
    ax_acc, ax_loss, _ = figures[0].axes
    for ax in (ax_acc, ax_loss):
        assert [line.get_label() for line in ax.get_lines()] == ['train', 'test (not used for selection)']
        assert ax.get_lines()[1].get_linestyle() == '--'
    assert list(ax_acc.get_lines()[1].get_ydata()) == [49, 53, 57, 61, 65]
