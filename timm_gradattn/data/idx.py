"""IDX files, the format of MNIST and Fashion-MNIST: a big-endian header (magic number, then one 4-byte size per
dimension) and the data bytes, gzipped or plain."""
import gzip
import struct
import zlib

import numpy as np

IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # unsigned bytes, 3 dimensions / 1 dimension


class IdxError(ValueError):
    """A file that is not a complete IDX file of the kind asked for; the message says what is wrong with it."""


def read_idx(path: str, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes, gzipped or plain (told apart by its first bytes), as a uint8 array.

    The header is trusted and checked, not a checksum: the magic number, and exactly as many data bytes as
    its dimensions promise. Raises IdxError completing the sentence "<path> ...".
    """
    kind = 'images' if magic == IDX_IMAGES else 'labels'
    zipped = False
    try:
        with open(path, 'rb') as f:
            zipped = f.read(2) == b'\x1f\x8b'
            f.seek(0)
            data = gzip.GzipFile(fileobj=f).read() if zipped else f.read()
    except (OSError, EOFError, zlib.error) as error:
        reason = ' '.join(str(error).split()).rstrip('.') or type(error).__name__
        raise IdxError(f'cannot be read{" as gzip (truncated or damaged?)" if zipped else ""}: {reason}') from error
    if len(data) < 4:
        raise IdxError(f'is truncated: {len(data)} bytes, not even an IDX header')
    found = struct.unpack('>I', data[:4])[0]
    if found != magic:
        raise IdxError(f'is not an IDX file of {kind}: magic number 0x{found:08X}, expected 0x{magic:08X}')
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f'is truncated: {len(data)} bytes, shorter than its {header}-byte IDX header')
    shape = struct.unpack(f'>{ndim}I', data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        what = 'is truncated' if len(data) - header < expected else 'has trailing bytes'
        raise IdxError(f'{what}: its header promises {" x ".join(map(str, shape))} = {expected} bytes of {kind}, '
                       f'the file holds {len(data) - header}')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()
