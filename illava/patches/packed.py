"""ViT-stage merging inside vision encoders that pack every image's patches into one `[total_patches, dim]`
sequence with `cu_seqlens` segments (Qwen2-VL, Qwen2.5-VL, LLaVA-ViT packing).

Each segment (an image, a frame, or a temporal slice) is merged independently. Merging works in *units* of
`unit` consecutive tokens (4 for Qwen2-VL, whose PatchMerger fuses every 4 consecutive tokens = one 2x2 window;
1 for encoders without such a merger): a unit's score is the mean of its tokens' scores, and units are merged
position-wise, so the PatchMerger still fuses real spatial windows.

The family supplies what differs: how to get a block's rotated q and k, and which block arguments must be
re-sliced for the survivors (`cu_seqlens`, `max_seqlen`, rotary tables, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .. import merge


@dataclasses.dataclass
class PackedRun:
    """One encoder call: the segments and what the merges have done to them so far."""

    cu_seqlens: torch.Tensor  # [S+1] current segment boundaries (int32, like the encoder's own)
    origin: torch.Tensor  # [N] index into the encoder's original packed sequence of each current token
    unit_grids: torch.Tensor  # [S, 2] (rows, cols) of each segment in units
    positions: torch.Tensor  # [S, Umax] original unit index of each surviving unit, -1 padding
    sources: torch.Tensor | None  # [S, U0max] current unit index each original unit went into (0 in padding)
    counts: list[torch.Tensor]  # [S] units per segment, before the first merge and after each one
    source_history: list[torch.Tensor] = dataclasses.field(default_factory=list)  # `sources` after each merge
    sliced: dict | None = None  # block arguments re-sliced for the current survivors
    rotary: tuple[torch.Tensor, ...] | None = None  # the encoder's per-token rotary tables, before any merge
    # [N] attention-window id of each current token, for encoders that alternate windowed and full attention
    window_of_token: torch.Tensor | None = None
    # per-unit features taken from intermediate blocks (`[units, D]`, one row per current unit, e.g. Qwen3-VL's
    # DeepStack features): every later merge is applied to them too, so each row keeps standing for the same
    # patches as the unit it belongs to
    followers: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def window_seqlens(self) -> torch.Tensor:
        """`cu_seqlens` of the current tokens' attention windows (windows left empty disappear)."""
        _, lengths = torch.unique_consecutive(self.window_of_token, return_counts=True)
        return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(self.cu_seqlens.dtype)

    @classmethod
    def start(cls, cu_seqlens: torch.Tensor, unit_grids: torch.Tensor, unit: int, track_sources: bool) -> PackedRun:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        units = lengths // unit
        slots = torch.arange(int(units.max()), device=cu_seqlens.device)
        positions = torch.where(slots[None, :] < units[:, None], slots[None, :], -1)
        return cls(
            cu_seqlens=cu_seqlens,
            origin=torch.arange(int(lengths.sum()), device=cu_seqlens.device),
            unit_grids=unit_grids,
            positions=positions,
            sources=positions.clamp(min=0) if track_sources else None,
            counts=[units],
        )


def removals(counts: torch.Tensor, units_removed: Callable[[int], int], describe_group: Callable[[int], str],
             setting: str) -> torch.Tensor:
    """`[G]` units each group loses at this layer; an error naming the setting if one would lose them all."""
    removed = torch.tensor([units_removed(int(count)) for count in counts.tolist()], device=counts.device)
    emptied = (counts - removed < 1).nonzero().flatten().tolist()
    if emptied:
        group = emptied[0]
        raise ValueError(
            f"{setting} leaves no token in {describe_group(group)}: {int(counts[group])} units left, "
            f"{int(removed[group])} to merge away at this layer; use a smaller r or a fraction"
        )
    return removed


def pad_segments(values: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[N, ...]` packed -> `[S, Lmax, ...]` padded, the `[S, Lmax]` validity mask and the `[N]` segment ids."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    offset = torch.arange(values.shape[0], device=values.device) - cu_seqlens[:-1].long()[segment]
    padded = values.new_zeros(lengths.numel(), int(lengths.max()), *values.shape[1:])
    padded[segment, offset] = values
    valid = torch.zeros(padded.shape[:2], dtype=torch.bool, device=values.device)
    valid[segment, offset] = True
    return padded, valid, segment


def merge_packed(
    run: PackedRun,
    hidden: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    unit: int,
    units_removed: Callable[[int], int],
    describe_segment: Callable[[int], str],
    setting: str,
    options: dict,
    attention_cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One merge step on packed `hidden [N, D]` with rotated `query`/`key [N, heads, head_dim]`.

    Tokens are scored by the attention they receive within the segments the block attended over
    (`attention_cu_seqlens`: attention windows, default the merge segments), summed over queries so that
    tokens of windows of different sizes compare fairly; then every merge segment loses its lowest units, the way
    `options` (`IllavaConfig.merge_options`) say.
    Updates `run` (boundaries, origins, positions, sources, counts, windows) and returns the packed survivors.
    """
    cu_seqlens = run.cu_seqlens
    scores = attention_mass(query, key, scale, cu_seqlens if attention_cu_seqlens is None else attention_cu_seqlens)
    padded_hidden, valid, _ = pad_segments(hidden, cu_seqlens)
    segments, longest, dim = padded_hidden.shape
    scores, _, _ = pad_segments(scores, cu_seqlens)
    units = run.counts[-1]
    unit_scores = scores.view(segments, longest // unit, unit).mean(dim=-1)
    unit_valid = valid[:, ::unit]
    removed = removals(units, units_removed, describe_segment, setting)
    if int(removed.max()) == 0:
        run.counts.append(units)
        if run.sources is not None:
            run.source_history.append(run.sources)
        return hidden
    units_hidden = padded_hidden.view(segments, longest // unit, unit * dim)  # a 2x2 window moves as one token
    plan = merge.plan_merge(unit_scores, removed, valid=unit_valid, x=units_hidden, **options)
    merged_units = merge.apply_merge(units_hidden, plan)
    keep_tokens = plan.keep.repeat_interleave(unit, dim=1)
    survivors = merged_units.view(segments, longest, dim)[keep_tokens]
    origin, _, _ = pad_segments(run.origin, cu_seqlens)
    run.origin = origin[keep_tokens]
    if run.window_of_token is not None:
        window_of_token, _, _ = pad_segments(run.window_of_token, cu_seqlens)
        run.window_of_token = window_of_token[keep_tokens]
    run.cu_seqlens = torch.nn.functional.pad(keep_tokens.sum(dim=1).cumsum(0), (1, 0)).to(cu_seqlens.dtype)
    run.positions = _compact_rows(run.positions, plan.keep)
    unit_cu_seqlens = cu_seqlens // unit
    run.followers = [merge.apply_merge(pad_segments(features, unit_cu_seqlens)[0], plan)[plan.keep]
                     for features in run.followers]
    if run.sources is not None:
        run.sources = merge.update_sources(run.sources, plan)
        run.source_history.append(run.sources)
    run.counts.append(units - removed)
    run.sliced = None
    return survivors


def attention_mass(query, key, scale, cu_seqlens) -> torch.Tensor:
    """`[N]` attention each token receives from the queries of its segment, summed over queries, mean over heads."""
    padded_query, valid, _ = pad_segments(query, cu_seqlens)
    padded_key, _, _ = pad_segments(key, cu_seqlens)
    received = merge.attention_received(padded_query.transpose(1, 2), padded_key.transpose(1, 2), scale, valid=valid)
    return (received * valid.sum(dim=1, keepdim=True))[valid]


def _compact_rows(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep `values[s, j]` where `keep[s, j]`, left-aligned per row, -1 padding."""
    counts = keep.sum(dim=1)
    out = torch.full((values.shape[0], int(counts.max())), -1, dtype=values.dtype, device=values.device)
    rows, columns = keep.nonzero(as_tuple=True)
    out[rows, (keep.long().cumsum(dim=1) - 1)[rows, columns]] = values[rows, columns]
    return out
