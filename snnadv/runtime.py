"""Process-wide settings that make the CPU path fast (the command line applies them).

Large temporary tensors.  The fused scan and the convolutions over T x B frames
allocate tensors of tens of MiB per layer per chunk.  glibc serves blocks that large
with ``mmap`` and gives them back to the kernel on ``free``, so every new tensor
page-faults its memory in again: on the development VM, allocating and filling a
32 MiB tensor took 12.7 ms, copying into an existing one 0.8 ms.
:func:`keep_freed_memory` asks glibc to keep freed memory in the heap for reuse
(``mallopt``: no ``mmap`` for large blocks, no trimming), the documented effect of
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``.  The cost: the process keeps its
peak memory until it exits.  Measured, VGG5 SNN-BP training step at T=32, batch 16,
2 cores: 17.4 -> 19.4 img/s (fp32), see the issue notes.  Nothing changes on other
C libraries or operating systems.

Applied by the command line at start-up (every ``snnadv`` command), never as a side
effect of building or running a model: a program that uses the library directly on
a CPU calls :func:`keep_freed_memory` once itself (the automatic chunk sizes of
:meth:`snnadv.models.SNN.chunk_for` assume it).  ``SNNADV_KEEP_FREED_MEMORY=0`` leaves
glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc reuse freed large blocks instead of returning them to the OS.

    Idempotent; returns whether the setting is in effect (False where the C
    library is not glibc).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("SNNADV_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _applied


def keep_freed_memory_applied() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process (the memory plan
    counts the heap's fragmentation then: :data:`snnadv.memory.CPU_HEAP_FACTOR`)."""
    return bool(_applied)


def tf32_policy() -> dict:
    """Choose TF32 explicitly for CUDA: off by default, so fp32 on a GPU computes in
    fp32 as on the CPU (cuDNN's own default would run fp32 convolutions as TF32);
    ``--precision bf16`` is the fast path.  ``SNNADV_TF32=1`` allows TF32 for fp32
    matmuls and convolutions.  Returns the choice, for results to record."""
    import torch

    allow = os.environ.get("SNNADV_TF32", "0") == "1"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    return {"tf32_matmul": allow, "tf32_cudnn": allow}
