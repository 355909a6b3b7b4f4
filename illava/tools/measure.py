"""Measuring a block of work: its peak memory (CUDA peak allocation on GPU, peak resident set size, sampled, on
CPU) and the wall-clock spans of a model's vision-encoder calls and forwards."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import torch

from ..registry import find_family


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
