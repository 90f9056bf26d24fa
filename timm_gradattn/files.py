"""Crash-safe writes: a reader (or a run resumed after a crash) sees the old file or folder or the new one, never a
torn one. Every file is written to a temporary name in the same folder, fsynced and renamed over the old one
(``os.replace`` is atomic on POSIX and Windows); a folder is written whole under a temporary name and swapped in
with two renames. Files get the modes ``open()`` would give under the umask, not a temporary file's 0600.

A write that fails (a full disk, a folder made read-only, a quota) is raised as ``WriteError``: one line naming the
file and the system's reason, which the entry points print without a traceback.
"""
import csv
import io
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Union

from .errors import UserError

__all__ = ['PathLike', 'WriteError', 'writing', 'atomic_write_bytes', 'atomic_write_text', 'atomic_write_csv',
           'atomic_link', 'replace_folder', 'replace_synced']

PathLike = Union[str, Path]


class WriteError(UserError, OSError):
    """A file or folder could not be written (``OSError`` underneath: disk full, permissions, read-only)."""

    def __init__(self, what: PathLike, error: OSError):
        self.path = Path(getattr(error, 'filename', None) or what)
        self.reason = error.strerror or str(error) or type(error).__name__
        super().__init__(f'Cannot write {self.path}: {self.reason}')


@contextmanager
def writing(what: PathLike) -> Iterator[None]:
    """Raise an ``OSError`` of the block as ``WriteError`` naming the file written (``what`` if it names none)."""
    try:
        yield
    except UserError:
        raise
    except OSError as error:
        raise WriteError(what, error) from error


def _fsync_dir(folder: Path) -> None:
    if os.name == 'nt':  # directories cannot be opened for fsync on Windows; NTFS journals the rename
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # Linux states it; asking os.umask means setting it for a moment, which other threads would see
        with open('/proc/self/status') as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def _give_default_modes(path: Path) -> None:
    """The modes ``open()``/``mkdir()`` give under the umask (0644 / 0755 under umask 022), for ``path`` and,
    if a folder, everything in it. safetensors' ``save_file`` and temporary files are 0600, which would make a
    run folder copied to a shared disk unreadable to its other users."""
    umask = _umask()
    for item in [path, *(path.rglob('*') if path.is_dir() else ())]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


def replace_synced(tmp: Path, path: Path) -> None:
    with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
    _give_default_modes(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_bytes(data)
    replace_synced(tmp, path)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_link(source: PathLike, path: PathLike) -> None:
    """``path`` becomes the same file as ``source`` (a hard link, or a copy where the file system has none),
    atomically. Files here are only ever replaced, never changed in place, so a link is safe to share."""
    source, path = Path(source), Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    replace_synced(tmp, path)


def replace_folder(tmp: PathLike, final: PathLike) -> None:
    """Swap a fully written folder ``tmp`` in as ``final`` (two renames; see ``find_last_checkpoint``),
    its files given the umask's modes first."""
    tmp, final = Path(tmp), Path(final)
    _give_default_modes(tmp)
    previous = final.with_name(f'{final.name}.prev')
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


def atomic_write_csv(path: PathLike, rows: Sequence[Dict[str, Any]]) -> None:
    """Rows of dicts as CSV; the columns are the union of the rows' keys, in first-seen order."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
