"""Host memory for long-running jobs: keep freed memory in the process instead of page-faulting it back every step.

XLA:CPU allocates each execution's temporaries afresh (about a GiB for the CPU benchmark's Mixtral train step).
glibc serves a block that large from a fresh ``mmap`` (XLA's worker threads allocate from per-thread arenas,
whose 64 MiB heaps cannot hold it, and ``free`` unmaps it again), so every step touches every page of it anew: a
page fault per page, a noticeable share of a CPU step (docs/benchmarks.md#host-memory-kept-in-the-process).

``keep_freed_memory()`` sets glibc's ``mallopt`` so the allocations come from the main heap and stay there: one
arena (``M_ARENA_MAX=1``), no ``mmap`` for large blocks (``M_MMAP_MAX=0``; glibc still maps when the heap cannot
grow), and the heap top is trimmed only past 2 GiB free (``M_TRIM_THRESHOLD``). Once the heap has grown to
the step's peak (a few steps), each step reuses the pages of the one before. The cost: the process keeps up to
2 GiB of freed memory at its heap top, and any free space below live blocks, instead of returning it to the
system; a training or serving process reaches that peak again every step anyway.

The command-line tools call it first thing, before JAX starts its CPU client (threads that already have an arena
keep it). ``MISTRAL_JAX_HOST_MALLOC=default`` leaves glibc's settings alone; other C libraries (musl, macOS) are
left alone too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "MISTRAL_JAX_HOST_MALLOC"
CHOICES = ("keep", "default")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB above the heap's live top


def setting() -> str:
    """The ``MISTRAL_JAX_HOST_MALLOC`` choice (``keep`` when unset); a bad value raises, naming the choices."""
    value = os.environ.get(ENV, "keep").strip().lower() or "keep"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {CHOICES}. Fix: unset it (keep freed host memory "
                         f"in the process, the default) or set {ENV}=default (glibc's own settings).")
    return value


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring). Returns whether the settings applied:
    False under ``MISTRAL_JAX_HOST_MALLOC=default`` or without glibc. Call it before JAX starts its CPU client."""
    if setting() == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = [libc.mallopt(param, value) for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))]
    return all(r == 1 for r in applied)  # mallopt returns 1 on success
