"""ViT-stage merging inside vision encoders that pack every image's patches into one `[total_patches, dim]`
sequence with `cu_seqlens` segments (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-ViT, the packing encoders).

Each segment (an image, a frame, or a temporal slice) is merged independently. Merging works in *units* of
`unit` consecutive tokens (4 for Qwen2-VL, whose PatchMerger fuses every 4 consecutive tokens = one 2x2 window;
1 for encoders without such a merger): a unit's score is the mean of its tokens' scores, and units are merged
position-wise, so the PatchMerger still fuses real spatial windows.

The family supplies what differs: how to get a block's rotated q and k, and which block arguments must be
re-sliced for the survivors (`cu_seqlens`, `max_seqlen`, rotary tables, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import merge
from .vision_stage import VisionRun, merge_groups


def start_packed(cu_seqlens: torch.Tensor, unit_grids: torch.Tensor, unit: int, track_sources: bool,
                 **layout) -> VisionRun:
    """The run of one packed call: segment i spans `cu_seqlens[i]:cu_seqlens[i+1]`, a `unit_grids[i]` grid of
    units of `unit` consecutive tokens."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return VisionRun.start(unit_grids, track_sources, units=lengths // unit, cu_seqlens=cu_seqlens,
                           origin=torch.arange(int(lengths.sum()), device=cu_seqlens.device), **layout)


def window_seqlens(run: VisionRun) -> torch.Tensor:
    """`cu_seqlens` of the current tokens' attention windows (windows left empty disappear)."""
    _, lengths = torch.unique_consecutive(run.window_of_token, return_counts=True)
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(run.cu_seqlens.dtype)


def current_boundaries(run: VisionRun) -> dict[str, tuple[torch.Tensor, int]]:
    """`cu_seqlens` of the current tokens and their longest segment, per kind of block: "images" (merge segments)
    and, for windowed encoders, "windows". Computed once per merge layer for all the blocks after it."""
    boundaries = {"images": run.cu_seqlens}
    if run.window_of_token is not None:
        boundaries["windows"] = window_seqlens(run)
    return {name: (value, int((value[1:] - value[:-1]).max())) for name, value in boundaries.items()}


def resliced_rotary(run: VisionRun) -> tuple[torch.Tensor, ...]:
    """The rotary tables' rows of the current tokens."""
    return tuple(table[run.origin] for table in run.rotary)


class Segments:
    """Packed segments of the given lengths: pads `[N, ...]` to `[S, Lmax, ...]`; segments of one length (a single
    image, the frames of a video) are a view, not a copy. The lengths are read once, for every tensor of the step."""

    def __init__(self, lengths: list[int], device: torch.device):
        self.count, self.longest = len(lengths), max(lengths)
        self.uniform = min(lengths) == self.longest
        self.valid = torch.arange(self.longest, device=device) < torch.tensor(lengths, device=device)[:, None]

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor) -> Segments:
        return cls((cu_seqlens[1:] - cu_seqlens[:-1]).tolist(), cu_seqlens.device)

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return values.view(self.count, self.longest, *values.shape[1:])
        padded = values.new_zeros(self.count, self.longest, *values.shape[1:])
        padded[self.valid] = values
        return padded


def pad_segments(values: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, ...]` packed -> `[S, Lmax, ...]` padded and the `[S, Lmax]` validity mask."""
    segments = Segments.of(cu_seqlens)
    return segments.pad(values), segments.valid


def merge_packed(
    run: VisionRun,
    hidden: torch.Tensor,
    query: torch.Tensor | None,
    key: torch.Tensor | None,
    scale: float,
    unit: int,
    units_removed: Callable[[int], int],
    describe_segment: Callable[[int], str],
    setting: str,
    options: dict,
    attention_cu_seqlens: torch.Tensor | None = None,
    prefix: int = 0,
    combine_scores: Callable[[torch.Tensor], torch.Tensor] | None = None,
    received: torch.Tensor | None = None,
) -> torch.Tensor:
    """One merge step on packed `hidden [N, D]` with rotated `query`/`key [N, heads, head_dim]`.

    Tokens are scored by the attention they receive within the segments the block attended over
    (`attention_cu_seqlens`: attention windows, default the merge segments), summed over queries so that
    tokens of windows of different sizes compare fairly; then every merge segment loses its lowest units, the way
    `options` (`IllavaConfig.merge_options`) say. The first `prefix` tokens of every segment (DINOv3's CLS and
    registers) attend and are attended to but are no units: they never merge and are not counted.
    `combine_scores` maps the `[N]` scores of the heads this process holds to those of all heads (tensor
    parallelism: every rank must choose the same survivors). `received`: those `[N]` scores when the block's own
    attention computed them (`scored_attention`); `query` and `key` are then not needed.
    Updates `run` (boundaries, origins, positions, sources, counts, windows, followers) and returns the packed
    survivors.
    """
    cu_seqlens = run.cu_seqlens
    units_before = run.counts[-1]
    removed = run.removals(units_removed, describe_segment, setting)
    segments = Segments.of(cu_seqlens)
    padded_hidden, valid = segments.pad(hidden), segments.valid
    count, longest, dim = padded_hidden.shape
    patches = longest - prefix

    def unit_scores():
        token_scores = received
        if token_scores is None:
            boundaries = cu_seqlens if attention_cu_seqlens is None else attention_cu_seqlens
            token_scores = attention_mass(query, key, scale, boundaries)
        if combine_scores is not None:
            token_scores = combine_scores(token_scores)
        return segments.pad(token_scores)[:, prefix:].reshape(count, patches // unit, unit).mean(dim=-1)

    # a 2x2 window moves as one token
    units_hidden = padded_hidden[:, prefix:].reshape(count, patches // unit, unit * dim)
    merged_units, plan = merge_groups(run, units_hidden, unit_scores, removed, options, valid=valid[:, prefix::unit])
    if plan is None:
        return hidden
    keep_tokens = plan.keep.repeat_interleave(unit, dim=1)
    merged = merged_units.view(count, patches, dim)
    if prefix:
        keep_tokens = torch.cat([valid[:, :prefix], keep_tokens], dim=1)
        merged = torch.cat([padded_hidden[:, :prefix], merged], dim=1)
    survivors = merged[keep_tokens]
    run.origin = segments.pad(run.origin)[keep_tokens]
    if run.window_of_token is not None:
        run.window_of_token = segments.pad(run.window_of_token)[keep_tokens]
    run.cu_seqlens = torch.nn.functional.pad((run.counts[-1] * unit + prefix).cumsum(0), (1, 0)).to(cu_seqlens.dtype)
    if run.followers:
        unit_segments = Segments(units_before.tolist(), units_before.device)
        run.followers = [merge.apply_merge(unit_segments.pad(features), plan)[plan.keep] for features in run.followers]
    return survivors


def attention_mass(query, key, scale, cu_seqlens) -> torch.Tensor:
    """`[N]` attention each token receives from the queries of its segment, summed over queries, mean over heads."""
    padded_query, valid = pad_segments(query, cu_seqlens)
    padded_key, _ = pad_segments(key, cu_seqlens)
    received = merge.attention_received(padded_query.transpose(1, 2), padded_key.transpose(1, 2), scale, valid=valid)
    return (received * valid.sum(dim=1, keepdim=True))[valid]
