"""End-to-end runs of train.py as a user runs it: the default job, resume after SIGKILL, multi-process
Accelerate, best-weight restoration, a non-finite loss and fine-tuning on an image folder.

Most runs use a quarter-width GradAttn (``--model-kwargs``) on 16 px digits so that a run takes seconds
on a CPU; the mechanics under test (checkpointing, data order, gathering, weight restoration) do not
depend on the width. Every subprocess gets ``OMP_NUM_THREADS=1``: steady speed on shared CI cores, and the
runs compared bit for bit use the same thread count.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import timm
import timm_gradattn  # noqa: F401  registers the models
from data_fixtures import write_image_folder
from train_runs import summary_rows
from timm_gradattn.checkpoint import load_weights
from timm_gradattn.data import build_datasets
from timm_gradattn.metrics import METRIC_KEYS, classification_metrics

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / 'train.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false')
TINY = ['--model-kwargs', 'channels=(16,32,64,128)', 'embed_dim=64', 'mlp_dim=128', 'num_heads=4',
        '--img-size', '16', '-b', '32']
REFERENCE = TINY + ['--epochs', '3']
RUN_FILES = {'config.yaml', 'summary.csv', 'results.json', 'model_best.safetensors', 'last', 'hub',
             'training_curves.png', 'reliability.png', 'confusion_matrix.png'}
RESULT_FACTS = {'model', 'dataset', 'protocol', 'seed', 'num_classes', 'label_names', 'best_epoch', 'epochs_run',
                'val_top1_best', 'train_top1_at_best', 'train_val_gap', 'seconds_per_epoch', 'num_params', 'machine',
                'pretrained_from', 'train_img_s', 'peak_rss_mb'}


def run_train(args: List[str], output: Path, experiment: str, launcher: List[str] = (),
              expect_rc: int = 0) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), TRAIN, *args, '--output', str(output), '--experiment', experiment]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == expect_rc, f'{command} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}'
    return done


def read_json(path: Path) -> Dict:
    return json.loads(path.read_text())


def evaluate_top1(run_dir: Path, weights: Path, img_size: int = 16) -> float:
    """Test-split top-1 of ``weights`` in the run's architecture, computed here without the engine."""
    model = timm.create_model(f'local-dir:{run_dir / "hub"}', pretrained=False).eval()
    load_weights(model, weights)
    data = build_datasets('digits', seed=42, img_size=img_size)
    logits, targets = [], []
    with torch.no_grad():
        for images, labels in DataLoader(data.test, batch_size=64):
            logits.append(model(images))
            targets.append(labels)
    return classification_metrics(torch.cat(logits), torch.cat(targets))['top1']


@pytest.fixture(scope='module')
def output(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('runs')


@pytest.fixture(scope='module')
def reference_run(output) -> Path:
    """An uninterrupted single-process tiny run: the baseline the resumed and multi-process runs are held to."""
    run_train(REFERENCE, output, 'reference')
    return output / 'reference'


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path):
    # `python train.py` with only fewer epochs: gradattn_resnet18_rope, digits 32 px, 1 channel, seed 42.
    done = run_train(['--epochs', '2'], tmp_path, 'default')
    run_dir = tmp_path / 'default'
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    results = read_json(run_dir / 'results.json')
    assert set(METRIC_KEYS) | RESULT_FACTS <= set(results)
    assert results['model'] == 'gradattn_resnet18_rope' and results['dataset'] == 'digits'
    assert results['num_classes'] == 10 and results['seed'] == 42 and results['pretrained_from'] is None
    assert results['top1'] > 50, results  # chance is 10 %; two epochs reach about 90 %
    assert results['epochs_run'] == 2 and len(summary_rows(run_dir)) == 2
    assert f'Test top-1 {results["top1"]:.2f}' in done.stdout and str(run_dir / 'hub') in done.stdout

    # The Hub export rebuilds the same network and gives the logits of the saved best weights.
    exported = timm.create_model(f'local-dir:{run_dir / "hub"}', pretrained=True).eval()
    assert exported.pretrained_cfg['input_size'] == (1, 32, 32)
    assert exported.pretrained_cfg['label_names'] == [str(i) for i in range(10)]
    best = timm.create_model('gradattn_resnet18_rope', num_classes=10, in_chans=1).eval()
    metadata = load_weights(best, run_dir / 'model_best.safetensors')
    assert metadata['model'] == 'gradattn_resnet18_rope'
    images = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(images), best(images))


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(output, reference_run):
    run_dir = output / 'killed'
    command = [sys.executable, TRAIN, *REFERENCE, '--output', str(output), '--experiment', 'killed']
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = run_dir / 'last' / 'state.json'
    deadline = time.monotonic() + 600
    while not state_file.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # in epoch 2: an epoch takes seconds, the poll 20 ms
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert read_json(state_file)['epochs_done'] == 1
    rows_before = summary_rows(run_dir)
    assert len(rows_before) == 1 and not (run_dir / 'results.json').exists()

    done = subprocess.run([sys.executable, TRAIN, '--resume', str(run_dir)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'Resuming' in done.stdout
    rows, reference_rows = summary_rows(run_dir), summary_rows(reference_run)
    assert rows[0] == rows_before[0]  # nothing already written is lost
    assert [r['epoch'] for r in rows] == ['1', '2', '3']
    # Tolerance: none beyond float formatting. On CPU with --workers 0 the resumed run repeats the
    # uninterrupted one exactly (same data order per (seed, epoch), restored generator/optimizer/scheduler state).
    for row, expected in zip(rows, reference_rows):
        for key in ('train_loss', 'train_top1', 'val_loss', 'val_top1', 'lr'):
            assert float(row[key]) == pytest.approx(float(expected[key]), rel=1e-6, abs=1e-9), (key, row, expected)
    weights, expected_weights = load_file(run_dir / 'last' / 'model.safetensors'), \
        load_file(reference_run / 'last' / 'model.safetensors')
    assert weights.keys() == expected_weights.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], expected_weights[key], rtol=0, atol=1e-6)
    results, expected_results = read_json(run_dir / 'results.json'), read_json(reference_run / 'results.json')
    assert results['top1'] == pytest.approx(expected_results['top1'], abs=1e-9)
    assert results['best_epoch'] == expected_results['best_epoch']


@pytest.mark.slow
def test_two_process_accelerate_run_agrees_with_single_process(output, reference_run):
    launcher = ['accelerate', 'launch', '--multi_gpu', '--num_processes', '2', '--main_process_port', '29533']
    # fp32: the test figures are compared exactly with an fp32 evaluation below (accelerate launch's own default, 'no',
    # leaves the machine's default, bf16 where native, as python train.py has it).
    run_train(REFERENCE + ['--grad-stats-every', '3', '--mixed-precision', 'no'], output, 'two_processes',
              launcher=launcher)
    run_dir = output / 'two_processes'
    assert RUN_FILES | {'grad_norms.jsonl'} <= {p.name for p in run_dir.iterdir()}
    assert {p.name for p in (run_dir / 'last').iterdir()} >= {'rng_state_0.safetensors', 'rng_state_1.safetensors'}
    results, single = read_json(run_dir / 'results.json'), read_json(reference_run / 'results.json')
    assert results['machine']['num_processes'] == 2 and single['machine']['num_processes'] == 1
    # --batch-size is global (split over processes): the same optimizer steps as the single-process run.
    assert read_json(run_dir / 'last' / 'state.json')['num_updates'] == \
        read_json(reference_run / 'last' / 'state.json')['num_updates']
    # Evaluation is exact: gathered test logits count each of the 271 test images once (271 is odd, so
    # Accelerate pads a batch), as a plain single-process evaluation of the same weights shows.
    assert results['top1'] == pytest.approx(evaluate_top1(run_dir, run_dir / 'model_best.safetensors'), abs=1e-9)
    # Training agrees only statistically: each process normalises its own half batch (BatchNorm, no
    # SyncBN) and draws its own dropout and augmentation. After 3 epochs of this tiny model the two runs have
    # differed by up to 17 points of test top-1 (73.4 vs 90.0 % on one CPU): both must have learned (5x chance)
    # and stay within 25 points.
    assert results['top1'] >= 50 and abs(results['top1'] - single['top1']) <= 25, (results['top1'], single['top1'])
    norms = [json.loads(line) for line in (run_dir / 'grad_norms.jsonl').read_text().splitlines()]
    assert [n['epoch'] for n in norms] == [3] and norms[0]['norms']


@pytest.mark.slow
def test_test_metrics_come_from_the_best_epoch(output):
    # From epoch 3 on the learning rate is 1000x higher (step schedule), which wrecks the model; early
    # stopping (patience 2) ends the run two epochs after the best one (epoch 1 or 2, depending on the seeded
    # start), and the test must see the best epoch's weights.
    run_train(TINY + ['--epochs', '6', '--sched', 'step', '--decay-epochs', '2', '--decay-rate', '1000',
                      '--patience', '2'], output, 'best_epoch')
    run_dir = output / 'best_epoch'
    rows, results = summary_rows(run_dir), read_json(run_dir / 'results.json')
    assert results['best_epoch'] <= 2
    assert results['stopped_early'] and results['epochs_run'] == results['best_epoch'] + 2 == len(rows)
    assert float(rows[-1]['val_top1']) < results['val_top1_best'] - 10, rows
    best_top1 = evaluate_top1(run_dir, run_dir / 'model_best.safetensors')
    last_top1 = evaluate_top1(run_dir, run_dir / 'last' / 'model.safetensors')
    assert results['top1'] == pytest.approx(best_top1, abs=1e-9)
    assert results['top1'] > last_top1 + 10, (best_top1, last_top1)
    assert results['train_top1_at_best'] == pytest.approx(float(rows[results['best_epoch'] - 1]['train_top1']))


@pytest.mark.slow
def test_a_resumed_run_tests_the_best_epoch_from_before_the_resume(output):
    # The best weights are tested from memory when this session saved them, else from model_best.safetensors:
    # here epoch 3 wrecks the model (learning rate x1000 from epoch 3), so the best epoch is 1 or 2, saved by the
    # first process; the resumed process trains epoch 3 and must test the file's weights.
    wreck = TINY + ['--sched', 'step', '--decay-epochs', '2', '--decay-rate', '1000']
    run_train(wreck + ['--epochs', '2'], output, 'resumed_best')
    run_dir = output / 'resumed_best'
    done = subprocess.run([sys.executable, TRAIN, '--resume', str(run_dir), '--epochs', '3'], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_json(run_dir / 'results.json')
    assert results['best_epoch'] <= 2 and results['epochs_run'] == 3, results
    assert results['top1'] == pytest.approx(evaluate_top1(run_dir, run_dir / 'model_best.safetensors'), abs=1e-9)
    assert results['top1'] > results['test_last_epoch']['top1'] + 10, results


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(output):
    # Epoch 1 trains normally; the step schedule then multiplies the learning rate by 1e38.
    done = run_train(TINY + ['--train-subset', '64', '--epochs', '3', '--sched', 'step', '--decay-epochs', '1',
                             '--decay-rate', '1e38', '--log-interval', '1'], output, 'nan', expect_rc=2)
    assert 'loss became nan' in done.stderr and 'Traceback' not in done.stderr
    run_dir = output / 'nan'
    assert read_json(run_dir / 'last' / 'state.json')['epochs_done'] == 1
    assert len(summary_rows(run_dir)) == 1 and not (run_dir / 'results.json').exists()
    weights = load_file(run_dir / 'last' / 'model.safetensors')
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


@pytest.mark.slow
def test_fine_tune_saved_model_on_image_folder(output, reference_run, tmp_path):
    folder = write_image_folder(str(tmp_path / 'shapes'), classes=3, per_class=10, size=16,
                                class_names=['circle', 'square', 'star'])
    source = reference_run / 'hub'
    common = ['--dataset', 'folder', '--data-dir', folder, '--in-chans', '1', '--img-size', '16', '-b', '8',
              '--epochs', '1', '--workers', '0']

    # A Hub export with a new 3-class head; only the head trains.
    run_train(['--model', f'local-dir:{source}', '--pretrained', '--freeze-backbone', *common], output, 'probe')
    run_dir = output / 'probe'
    results = read_json(run_dir / 'results.json')
    assert results['num_classes'] == 3 and results['label_names'] == ['circle', 'square', 'star']
    assert results['pretrained_from'] == f'local-dir:{source}'
    tuned, original = load_file(run_dir / 'model_best.safetensors'), load_file(source / 'model.safetensors')
    assert tuned['head.weight'].shape == (3, 64) and original['head.weight'].shape == (10, 64)
    for key in original:
        if not key.startswith('head.'):
            assert torch.equal(tuned[key], original[key]), f'{key} changed although the backbone was frozen'
    exported = timm.create_model(f'local-dir:{run_dir / "hub"}', pretrained=True)
    assert exported.num_classes == 3 and exported.pretrained_cfg['label_names'] == ['circle', 'square', 'star']

    # Safetensors weights into a registry model, all layers training with layer-wise lr decay.
    checkpoint = reference_run / 'model_best.safetensors'
    run_train([*TINY[:5], '--initial-checkpoint', str(checkpoint), '--layer-decay', '0.75', *common],
              output, 'initial_checkpoint')
    run_dir = output / 'initial_checkpoint'
    results = read_json(run_dir / 'results.json')
    assert results['num_classes'] == 3 and results['pretrained_from'] == str(checkpoint)
    tuned, original = load_file(run_dir / 'model_best.safetensors'), load_file(checkpoint)
    # Three small Adam steps from the loaded weights, not from a fresh initialisation.
    assert (tuned['stem.conv.weight'] - original['stem.conv.weight']).abs().max() < 0.02


def test_a_head_wider_than_the_dataset_names_its_extra_outputs(output, tmp_path):
    # --num-classes above the dataset's count: the plots, the export and evaluate name outputs 10 and 11.
    run_train([*TINY, '--num-classes', '12', '--epochs', '1', '--train-subset', '32', '--workers', '0'],
              output, 'wide_head')
    run_dir = output / 'wide_head'
    assert (run_dir / 'confusion_matrix.png').stat().st_size > 10_000
    exported = timm.create_model(f'local-dir:{run_dir / "hub"}', pretrained=True)
    assert exported.num_classes == 12 and exported.pretrained_cfg['label_names'] == [str(i) for i in range(12)]
    from timm_gradattn.evaluate import main as evaluate
    written = evaluate(['--model', f'local-dir:{run_dir / "hub"}', '--pretrained', '--dataset', 'digits',
                        '--workers', '0', '--output', str(tmp_path / 'eval')])
    assert len(written['confusion_matrix']) == 12 and written['label_names'][10:] == ['10', '11']
    assert (tmp_path / 'eval' / 'confusion_matrix.png').stat().st_size > 10_000


@pytest.mark.slow
def test_training_options_run_together(output):
    # EMA, mixup with label smoothing, gradient accumulation, clipping and bf16 autocast in one short run.
    # 32 px, not 16: at 16 px the last stage's stride-2 convolution sees 1x1 maps, where torch's CPU bf16
    # backward leaves part of the weight gradient unwritten (garbage, at times NaN; see _stop_unless_finite).
    run_train(TINY + ['--img-size', '32', '--train-subset', '64', '--epochs', '2', '--model-ema', '--mixup', '0.2',
                      '--smoothing', '0.1', '--grad-accum-steps', '2', '--clip-grad', '1.0',
                      '--mixed-precision', 'bf16', '--recipe', 'paper'], output, 'options')
    run_dir = output / 'options'
    results = read_json(run_dir / 'results.json')
    assert results['machine']['mixed_precision'] == 'bf16' and results['epochs_run'] == 2
    assert (run_dir / 'last' / 'ema.safetensors').is_file()
    state = read_json(run_dir / 'last' / 'state.json')
    assert state['num_updates'] == 2  # per epoch: 64 images = two batches of 32 = one optimizer step
    assert state['scheduler']['patience'] == 3, 'the paper recipe keeps its plateau counters'
    # Best weights are the EMA's: what was validated is what is saved and tested.
    assert results['val_top1_best'] == max(float(r['val_top1']) for r in summary_rows(run_dir))


def test_compiled_training_saves_the_models_own_parameter_names(output):
    # aot_eager runs torch.compile's graph capture and autograd tracing without code generation: the wrapper
    # Accelerate puts around the model is what is under test (saves, EMA, export), not inductor's kernels.
    run_train(TINY + ['--train-subset', '64', '--epochs', '1', '--torchcompile', 'aot_eager', '--model-ema'],
              output, 'compiled')
    run_dir = output / 'compiled'
    assert read_json(run_dir / 'results.json')['machine']['torch_compile'] == 'aot_eager'
    for weights in (run_dir / 'model_best.safetensors', run_dir / 'last' / 'model.safetensors',
                    run_dir / 'last' / 'ema.safetensors', run_dir / 'hub' / 'model.safetensors'):
        with safe_open(weights, 'pt') as f:
            keys = list(f.keys())
        assert 'head.weight' in keys and not any(k.startswith('_orig_mod') for k in keys), weights
