"""Host-side settings that make CPU training faster without changing what it computes."""
import ctypes
import ctypes.util
import platform

__all__ = ['keep_freed_memory']

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    By default glibc unmaps large freed blocks and trims the heap, so every CPU training step page-faults
    its activations and gradients in again. Together with the fused optimizer step, this took train.py's
    default digits run from 452 to 614 training images/s on a 2-core CPU
    (``benchmarks/results/pipeline_speed*.md``). PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``)
    avoids this by preloading a caching allocator; this does the same with glibc's own settings, for this
    process only. The process then keeps its peak heap (which a training loop reaches again every step
    anyway). Returns False where there is no glibc (macOS, Windows, musl), which changes nothing.
    """
    name = ctypes.util.find_library('c')
    if not name or platform.system() != 'Linux':
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    # 32 MiB is glibc's largest mmap threshold on 64-bit: blocks up to that size come from the reusable heap.
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
