"""Every plot writes a PNG from the files and records the rest of the project produces."""
import csv
import json

import pytest
import torch
from PIL import Image

from timm_gradattn import plots
from timm_gradattn.analysis import DepthRoutingSummary, RoutingSummary, SpatialAttention, read_grad_norms
from timm_gradattn.metrics import confusion_matrix, reliability_bins
from timm_gradattn.plots import (
    plot_cam, plot_cam_grid, plot_confusion_matrix, plot_depth_routing, plot_gradient_norms, plot_reliability_diagram,
    plot_routing, plot_spatial_attention, plot_training_curves, read_summary_csv,
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


def test_cam_grid_has_a_row_per_model_under_the_same_images(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 28, 28, generator=generator)
    maps = {name: torch.rand(3, 28, 28, generator=generator).numpy() for name in ('gradattn', 'resnet20_mha')}
    labels = ['cat', 'dog', 'bird']
    predictions = {'gradattn': ['cat', 'cat', 'bird'], 'resnet20_mha': labels}
    one = plot_cam(images, maps['gradattn'], tmp_path / 'cam.png', labels, predictions['gradattn'])
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, '_save', lambda fig, path: figures.append(fig) or save(fig, path))
    grid = plot_cam_grid(images, maps, tmp_path / 'cam_grid.png', labels=labels, predictions_by_model=predictions)
    _assert_png(one, min_side=250)
    _assert_png(grid)
    with Image.open(one) as single, Image.open(grid) as several:
        assert several.width == single.width and several.height > 1.3 * single.height  # one more row of maps
    # Panels titled row by row: the true classes over the images, each model's predictions over its maps, red where
    # the prediction is wrong.
    titled = [(ax.get_title(), ax.title.get_color()) for ax in figures[0].axes if ax.get_title()]
    assert [title for title, _ in titled] == labels + predictions['gradattn'] + predictions['resnet20_mha']
    assert [index for index, (_, colour) in enumerate(titled) if colour == plots._VAL_COLOR] == [4]
    with pytest.raises(ValueError, match=r'resnet20_mha: maps of shape \(2, 28, 28\) for 3 images'):
        plot_cam_grid(images, dict(maps, resnet20_mha=maps['resnet20_mha'][:2]), tmp_path / 'bad.png')
    with pytest.raises(ValueError, match='gradattn: 2 predictions for 3 images'):
        plot_cam_grid(images, maps, tmp_path / 'bad.png', predictions_by_model={'gradattn': ['cat', 'dog']})
