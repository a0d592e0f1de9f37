"""compat.allocator: with freed memory kept, a large block comes from the heap and stays there.

Each case runs in a fresh interpreter (malloc settings are process-wide). glibc's own counters
(mallinfo2) tell where a block came from: `hblkhd` counts bytes in separate mmaps (returned to
the OS on free, faulted in again on the next allocation), `arena` the heap.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_terapipe.compat import allocator

_PROBE = """
import ctypes, ctypes.util, json, sys
import torch
from megatron_terapipe.compat.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
held = keep_freed_memory() if sys.argv[1] == "hold" else False
before = libc.mallinfo2()
block = torch.empty(12 * 2**20)  # 48 MiB: above glibc's largest adaptive mmap threshold
block.fill_(1.0)
alive = libc.mallinfo2()
del block
freed = libc.mallinfo2()
mib = lambda n: n / 2**20
print(json.dumps({"held": held,
                  "mmapped_alive": mib(alive.hblkhd - before.hblkhd),
                  "heap_alive": mib(alive.arena - before.arena),
                  "heap_after_free": mib(freed.arena - before.arena)}))
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="glibc's mallopt/mallinfo2 (Linux)")


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_kept_memory_comes_from_the_heap_and_stays_after_free():
    held = _probe("hold")
    assert held["held"] is True
    assert held["mmapped_alive"] == 0, held        # no separate mapping ...
    assert held["heap_alive"] >= 47, held           # ... the heap grew instead
    assert held["heap_after_free"] >= 47, held      # and was not trimmed on free


@glibc
def test_without_the_setting_the_block_is_a_mapping_given_back_on_free():
    """The probe can tell the difference: glibc's default mmaps the block and unmaps it."""
    plain = _probe("plain")
    assert plain["held"] is False
    assert plain["mmapped_alive"] >= 47, plain
    assert plain["heap_after_free"] < 47, plain


def test_note_says_what_was_applied():
    assert "freed memory kept" in allocator.allocator_note(True)
    assert "freed memory kept" not in allocator.allocator_note(False)
