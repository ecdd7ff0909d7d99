"""Cost measurements: wall time, peak memory, KV bytes.

Peak memory is measured, never computed: on CUDA from the caching allocator (``max_memory_allocated`` over the
measured region, minus what was allocated when it began); on CPU by sampling the process's resident set size
every 2 ms in a background thread (peak RSS during the region minus RSS when it began). The CPU figure is
coarser (allocator reuse and sampling granularity) and is labelled ``cpu_rss_sampled`` wherever it appears.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class MemoryReading:
    peak_bytes: int
    source: str  # "cuda_allocator" or "cpu_rss_sampled"


class PeakMemory:
    """Context manager measuring the peak memory growth of the enclosed region on ``device``."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.reading: MemoryReading | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start = rss_bytes()
            self._peak = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._start
            self.reading = MemoryReading(max(0, peak), "cuda_allocator")
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
            self.reading = MemoryReading(max(0, self._peak - self._start), "cpu_rss_sampled")


class Stopwatch:
    """Wall-clock timer that synchronizes ``device`` before reading the clock."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.start = 0.0

    def reset(self) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self.start


def precise_cpu_memory(threshold_bytes: int = 1 << 16) -> bool:
    """Ask glibc to serve allocations above ``threshold_bytes`` with mmap, so freed tensors leave the resident
    set at once and RSS tracks live memory (used by the CLI before CPU measurements; a process-wide setting,
    never applied at import). Returns False where glibc's ``mallopt`` is unavailable."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def prepare_measurement(device: torch.device | str) -> None:
    """Set this process up for peak-memory measurement on ``device`` the one way every executor uses (inline,
    local worker processes, Ray workers): on CPU, :func:`precise_cpu_memory` (so sampled RSS tracks live
    memory); nothing on CUDA (the allocator's counters need no setup)."""
    if torch.device(device).type == "cpu":
        precise_cpu_memory()
