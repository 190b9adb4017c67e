"""Process-level settings that make training fast on CPU."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_RETAINED = False


def retain_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep freed blocks below ``limit_bytes`` for reuse.

    By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it when
    freed, so the (rows, tokens, vocabulary) logits of each update, about 300 MB at a 50k
    vocabulary, page-fault in anew every time: on 2 cores that was half of a GRPO step's update
    time. PyTorch's CPU allocator does not cache; Intel's tuning guide swaps in jemalloc for the
    same reason. The cost is that the process keeps its peak heap. Linux with glibc only; returns
    whether the setting took.
    """
    global _RETAINED
    if _RETAINED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _RETAINED = bool(libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, min(2 * limit_bytes, 2**31 - 1))
        )
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    return _RETAINED
