"""Peak memory of a block of work: CUDA peak allocation on GPU, peak resident set size (sampled) on CPU."""

from __future__ import annotations

import os
import threading
import time

import torch


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`; then `peak.bytes` is the peak above the level at entry.

    On CPU the resident set size is sampled every half millisecond from /proc (Linux); freed memory that the
    allocator keeps is not seen as a drop, so compare runs made in separate processes, or set
    `MALLOC_MMAP_THRESHOLD_=65536` so large tensors go back to the OS when freed.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.bytes = 0
        self._running = False

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._peak = self._rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._running = False
        self._thread.join()
        self.bytes = max(self._peak, self._rss()) - self._start
