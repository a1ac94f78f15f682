"""Peak memory of one call: CUDA allocator peak on GPU, sampled resident set size on CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS, so that RSS growth measures the next call's own peak
    (otherwise memory freed by an earlier call is reused without showing up as growth)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (a no-op on CPU), so that host timers measure the work itself."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(fn: Callable[[], Any], device: torch.device | str = "cpu", interval_s: float = 0.002):
    """Run ``fn`` and return ``(result, peak_bytes_above_baseline)``.

    On CUDA: ``max_memory_allocated`` after a reset, minus what was allocated before the call. On CPU:
    ``ru_maxrss`` only ever grows over a process's life (a model load can set it), so a thread samples
    the RSS every ``interval_s`` during the call; the peak minus the RSS before the call is returned.
    Free heap memory is returned to the OS first (glibc ``malloc_trim``), so calls measured one after
    another in one process each show their own peak.
    Short spikes between samples can be missed, so CPU peaks are lower bounds.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    release_free_memory()
    base = current_rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, current_rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, current_rss_bytes())
    return result, peak - base
