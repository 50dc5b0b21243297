"""`bonewatch.memory.release` hands freed heap pages back to the system (issue 16: the backfill's
peak RSS). Run in a fresh process so other tests' allocations do not blur the numbers."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from pathlib import Path
from bonewatch import memory

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024

# 400 MiB in 64 KiB blocks (under glibc's mmap threshold: they live in the heap), every 16th
# kept: the heap cannot shrink from its top, only by releasing the free pages in its middle
blocks = [bytearray(64 * 1024) for _ in range(6400)]
kept = blocks[::16]
del blocks
before = rss()
released = memory.release()
print(released, before, rss())
"""


def test_release_returns_the_freed_pages_in_the_middle_of_the_heap():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    released, before, after = run.stdout.split()
    assert released == "True"                 # glibc (Linux, Debian): malloc_trim exists
    assert int(before) - int(after) > 200     # MiB: most of the 375 MiB freed goes back
