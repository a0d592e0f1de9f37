"""Hold the CPU allocator equal across the variants a benchmark compares.

glibc's malloc serves large blocks with fresh `mmap`s and returns freed heap tops to the OS, so a
process that frees and re-allocates megabyte activations every step faults their pages in again
every step, and which variant pays depends on its tensor sizes and on glibc's adaptive thresholds.
Measured on the benchmark model (PP = 2, seq 2048): stock 1F1B (8 MiB MLP activations) took 9-28
thousand minor faults a step on the last stage and its rounds spread by up to 25 %; the token
pipeline (slice-sized tensors) about ten. With this setting every same-kernel variant took 0-50 a
step after warm-up, stock ran 5-10 % faster and the rounds spread by about 3 %. A GPU run has no
such term (CUDA's caching allocator keeps what it once held), so a CPU benchmark that left it in
would credit the schedule with an allocator artefact. `keep_freed_memory()` makes freed memory stay
in the process (no mmap, no trim): every variant then runs on memory the process already owns, after
warm-up.

CPU-only, glibc-only; elsewhere it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never shrink it; True if glibc took it.

    Process-wide and idempotent: call it once, before the first large allocation.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hold
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def allocator_note(held: bool) -> str:
    """What a benchmark's output says about the CPU allocator, given keep_freed_memory()'s
    answer."""
    if held:
        return "glibc malloc: freed memory kept in the process (no mmap, no trim), every variant"
    return "CPU allocator as the platform gives it (glibc tunables not applied)"


def minor_page_faults() -> int:
    """Minor page faults of this process so far (first touches of memory the OS hands out)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
