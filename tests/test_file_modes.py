"""Every file the project writes gets the mode the umask gives (0644 under umask 022), not safetensors' or a
temporary file's 0600: a run folder copied to a shared disk stays readable to the other users."""
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import timm

import timm_gradattn  # noqa: F401  (registers the models)
from timm_gradattn.checkpoint import atomic_save_weights
from timm_gradattn.files import atomic_write_bytes, atomic_write_csv, atomic_write_text, replace_folder
from timm_gradattn.hub import export_hub_folder


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_single_files_get_the_umask_mode(tmp_path, umask):
    atomic_save_weights({'w': torch.zeros(2)}, tmp_path / 'weights.safetensors')
    atomic_write_text(tmp_path / 'state.json', '{}')
    atomic_write_bytes(tmp_path / 'optimizer.pt', b'x')
    atomic_write_csv(tmp_path / 'summary.csv', [{'epoch': 1}])
    for name in ('weights.safetensors', 'state.json', 'optimizer.pt', 'summary.csv'):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name


def test_a_stale_private_temporary_file_does_not_keep_its_mode(tmp_path, umask):
    stale = tmp_path / '.results.json.tmp'  # left by a crash, private
    stale.write_text('old')
    stale.chmod(0o600)
    atomic_write_text(tmp_path / 'results.json', 'new')
    assert _mode(tmp_path / 'results.json') == 0o666 & ~umask


def test_replaced_folder_gets_the_umask_modes(tmp_path, umask):
    tmp = tmp_path / 'export.tmp'
    (tmp / 'nested').mkdir(parents=True)
    save_file({'w': torch.zeros(2)}, str(tmp / 'model.safetensors'))  # 0600, whatever the umask
    (tmp / 'nested' / 'notes.txt').write_text('x')
    (tmp / 'nested' / 'notes.txt').chmod(0o600)
    replace_folder(tmp, tmp_path / 'export')
    folder = tmp_path / 'export'
    assert _mode(folder / 'model.safetensors') == _mode(folder / 'nested' / 'notes.txt') == 0o666 & ~umask
    assert _mode(folder) == _mode(folder / 'nested') == 0o777 & ~umask


def test_hub_export_gets_the_umask_modes(tmp_path, umask):
    model = timm.create_model('gradattn_resnet18_nope', num_classes=3, in_chans=1)
    folder = export_hub_folder(model, tmp_path / 'hub', input_size=(1, 32, 32), mean=(0.5,), std=(0.5,))
    files = sorted(p for p in folder.iterdir())
    assert {p.name for p in files} >= {'config.json', 'model.safetensors'}
    assert all(_mode(p) == 0o666 & ~umask for p in files), {p.name: oct(_mode(p)) for p in files}
