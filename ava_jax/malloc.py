"""The host allocator's thresholds, so that XLA's CPU temporaries are reused between steps.

XLA's CPU runtime allocates a program's temporaries (one buffer, tens of MiB for a tiny model's train
step) with `malloc` at every call and frees them at its end. glibc maps any chunk above its mmap
threshold (it rises with use to at most 32 MiB) straight from the kernel and unmaps it on free, so
such a buffer is faulted in page by page, and zeroed, at every step: 13,250 minor faults and 25-35 ms
of system time in a 155 ms DPO step of the TinyStories model (docs/performance.md, ninth and tenth
passes). With the threshold at 64 MiB, and the trim threshold at twice that (glibc's own ratio), the
buffer stays in the heap and the next step takes it again without a fault.

64 MiB is the size of a thread arena's heap in 64-bit glibc, and XLA allocates on its worker threads,
so a larger threshold would change nothing for them; larger temporaries (1.6 GiB for a 135M model's
step) are still mapped each step, where `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` at process start
makes the mappings transparent huge pages (README, "The host allocator").

`python -m ava_jax.main` and the table and learning-curve drivers call `keep_temporaries_on_heap()`
first; a notebook or a script of one's own can call it too. It changes nothing where the C library
is not glibc, or where the user's `GLIBC_TUNABLES` sets either threshold (the user's choice wins).
"""
from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
# mallopt's parameter numbers (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_temporaries_on_heap(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Sets glibc's mmap and trim thresholds for this process (`mallopt`); True when they were set.

    False, and nothing changed, where the C library is not glibc or `GLIBC_TUNABLES` already sets
    `glibc.malloc.mmap_threshold` or `glibc.malloc.trim_threshold`. Chunks allocated before the
    call are unaffected; the settings hold for the rest of the process.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(f"glibc.malloc.{name}=" in tunables for name in ("mmap_threshold", "trim_threshold")):
        return False
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):  # not a GNU system
        libc = ""
    if not libc.startswith("glibc"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: glibc versions that cap it at half a thread heap (32 MiB; Debian 12's
    # 2.36 does not) refuse it, and then nothing is changed. The trim threshold takes any value.
    if not mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
