import subprocess
import sys

import pytest

# Allocates three 20 MB tensors and frees them, 20 times, touching every page, and prints the
# minor page faults that took (as a block loop does, the freed memory outgrows glibc's
# trim threshold, so the heap is given back); with reuse_freed_memory() first, it is kept.
FAULTS = """
import resource, sys, torch
from itmkit.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
def block():
    return [torch.ones(5 * 2**20) for _ in range(3)]
block()  # the first round faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout
    applied, count = out.split()
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again():
    _, plain = faults("plain")
    applied, reused = faults("reuse")
    assert applied == "True"
    assert plain > 20 * 5000  # 20 MB is ~5,000 fresh 4 KiB pages, faulted in again each round
    assert reused < plain / 20
