"""Measuring a block of work: its peak memory (CUDA peak allocation on GPU, peak resident set size, sampled, on
CPU) and the wall-clock spans of a model's vision-encoder calls and forwards."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Iterator

import torch

from ..registry import find_family

logger = logging.getLogger(__name__)

# glibc's mallopt parameters, and the values its dynamic thresholds settle at for large tensors
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_SETTLED_MMAP_THRESHOLD = 32 * 2**20


def on_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"  # "cuda:1" too


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if on_cuda(device):
        torch.cuda.synchronize()


@contextlib.contextmanager
def stage_spans(model, device: str | torch.device = "cpu") -> Iterator[dict[str, list[tuple[float, float]]]]:
    """`with stage_spans(model, device) as spans: model.generate(...)`: then `spans["vision"]` and
    `spans["forward"]` hold the (start, end) `time.perf_counter()` of every vision-encoder call and every forward of
    `model` (the first forward of a generate is the prefill)."""
    spans: dict[str, list[tuple[float, float]]] = {"vision": [], "forward": []}
    started: dict[str, float] = {}

    def timer(name):
        def start(module, *unused):
            synchronize(device)
            started[name] = time.perf_counter()

        def stop(module, *unused):
            synchronize(device)
            spans[name].append((started[name], time.perf_counter()))

        return start, stop

    handles = []
    for module, name in ((find_family(model).vision_tower(model), "vision"), (model, "forward")):
        start, stop = timer(name)
        handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        yield spans
    finally:
        for handle in handles:
            handle.remove()


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`; then `peak.bytes` is the peak above the level at entry.

    On CPU the resident set size is sampled every half millisecond from /proc (Linux); freed memory that the
    allocator keeps is not seen as a drop, so measure inside `memory_returned_to_os()` (or compare runs made in
    separate processes).
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


@contextlib.contextmanager
def memory_returned_to_os() -> Iterator[None]:
    """While inside, a run's resident size rises by what it allocates, so `PeakMemory` on CPU sees each run's own
    peak: on entry the free memory the allocator kept goes back to the OS (glibc's `malloc_trim`: reusing it
    page-faults it in again), and new tensors of 64 KiB or more are mmap'ed and unmapped when freed (`mallopt`).
    Allocation then costs page faults (on this project's CPU machine: 57 -> 73 ms per Qwen3-VL vision block, more
    for smaller tensors): take timings outside it. Elsewhere than glibc it changes nothing.
    """
    library = ctypes.util.find_library("c")
    libc = ctypes.CDLL(library) if library else None
    if libc is None or not hasattr(libc, "mallopt") or not libc.mallopt(_M_MMAP_THRESHOLD, 65536):
        logger.warning("no glibc mallopt here: peak memory on CPU includes memory freed earlier in the process")
        yield
        return
    libc.mallopt(_M_TRIM_THRESHOLD, 0)
    libc.malloc_trim(0)  # free memory kept from before leaves the resident set, so reusing it counts again
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _SETTLED_MMAP_THRESHOLD)
