"""Measuring a block of work: its peak tensor memory (CUDA's peak allocation on GPU, torch's profiler's allocation
events on CPU) and the wall-clock spans of a model's vision-encoder calls and forwards."""

from __future__ import annotations

import contextlib
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
    """`with PeakMemory(device) as peak: ...`; then `peak.bytes` is the peak of live tensor memory above the level at
    entry: `torch.cuda.max_memory_allocated` on GPU; on CPU, from the allocations and frees torch's profiler records
    (`profile_memory`), so neither the allocator's caching nor the rest of the process enters, as on GPU. (Sampling
    the resident set size instead moved a 50 MiB peak by 70% from run to run: freed memory the allocator keeps, pages
    faulted in again.) The profiler slows the block a little: take timings apart.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.cuda = on_cuda(device)
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._profile.__exit__(*exc)
        # allocations are booked on the op that made them, frees as "[memory]" events: in time order, the running sum
        changes = sorted((event.time_range.start, event.self_cpu_memory_usage)
                         for event in self._profile.events() if event.self_cpu_memory_usage)
        live = peak = 0
        for _, change in changes:
            live += change
            peak = max(peak, live)
        self.bytes = peak
