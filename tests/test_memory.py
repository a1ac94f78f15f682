"""Peak memory of calls measured one after another in one process (the demo's memory column)."""

from __future__ import annotations

import sys

import pytest
import torch

from sparse_llm.measure import _malloc_trim, measure_peak


def _allocate_400_mib():
    # Many mid-sized tensors (below glibc's mmap threshold once it has grown): freed memory stays in
    # the heap and is reused by the next call unless it is returned to the OS.
    tensors = [torch.ones(1000, 100) for _ in range(1000)]
    return float(sum(t[0, 0] for t in tensors))


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc only")
def test_consecutive_measurements_each_see_their_own_peak():
    peaks = [measure_peak(_allocate_400_mib)[1] / 2**20 for _ in range(3)]
    assert peaks[0] > 300, peaks
    assert min(peaks[1:]) > 0.8 * peaks[0], peaks  # before malloc_trim: 409, 0, 0 MiB
