"""The iLLaVA merge step as pure tensor code (no model knowledge).

Tokens come in independent groups (crops, frames, packed segments, LLM visual spans): `x [G, N, D]` with
`scores [G, N]`, optionally a `valid [G, N]` mask when groups of different lengths are padded to N. One step with
count r (per group):

1. the r+1 lowest-scored valid tokens g_0 (lowest) .. g_r are chosen;
2. their rank-weighted mean sum_k w_k x[g_k] / sum_k w_k, w_k = r+1-k, is accumulated in fp32 and cast back to
   x's dtype;
3. that value replaces x[g_r] (the best-scored member); g_0 .. g_{r-1} are dropped;
4. survivors keep their original order.

Bookkeeping is O(N) per group: `positions` (the original index each survivor sits at) and, when tracked,
`sources` (for every original token, the index of the current token that stands for it).
"""

from __future__ import annotations

import dataclasses

import torch

# Elements of fp32 attention probabilities materialised at once by `attention_received` (64 MiB).
_SCORE_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass
class MergePlan:
    """What one merge step does to each group."""

    keep: torch.Tensor  # [G, N] bool: survivors (valid tokens not merged away)
    members: torch.Tensor  # [G, R+1] long: g_0 .. g_R per group (R = max r); entries past a group's r are unused
    weights: torch.Tensor  # [G, R+1] fp32: rank weights, 0 past a group's r
    target: torch.Tensor  # [G] long: g_r, the token that receives the merged value


def plan_merge(scores: torch.Tensor, r: int | torch.Tensor, valid: torch.Tensor | None = None) -> MergePlan:
    """Choose, per group, the r+1 lowest-scored tokens and their rank weights.

    `r` is an int or a `[G]` tensor; every group must hold at least r+1 valid tokens.
    """
    num_groups, num_tokens = scores.shape
    device = scores.device
    r_per_group = torch.as_tensor(r, device=device, dtype=torch.long).expand(num_groups)
    keyed = scores.detach().float()
    if valid is not None:
        keyed = keyed.masked_fill(~valid, float("inf"))
        available = valid.sum(dim=1)
    else:
        available = torch.full((num_groups,), num_tokens, device=device)
    if bool((r_per_group < 0).any()) or bool((r_per_group + 1 > available).any()):
        raise ValueError(f"merge count r={r_per_group.tolist()} needs r+1 <= tokens per group {available.tolist()}")
    max_r = int(r_per_group.max()) if num_groups else 0
    # The r+1 lowest, lowest first; ties break towards the earlier token so the choice is deterministic.
    members = keyed.argsort(dim=1, stable=True)[:, : max_r + 1]
    rank = torch.arange(max_r + 1, device=device)
    weights = (r_per_group[:, None] + 1 - rank).clamp(min=0).float()
    target = members.gather(1, r_per_group[:, None]).squeeze(1)
    dropped = torch.zeros(num_groups, num_tokens, dtype=torch.bool, device=device)
    dropped.scatter_(1, members, rank[None, :] < r_per_group[:, None])
    keep = ~dropped if valid is None else valid & ~dropped
    return MergePlan(keep=keep, members=members, weights=weights, target=target)


def apply_merge(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """`x [G, N, D]` with each group's target replaced by the rank-weighted mean (still `[G, N, D]`)."""
    gathered = x.gather(1, plan.members[..., None].expand(-1, -1, x.shape[-1])).float()
    merged = (gathered * plan.weights[..., None]).sum(dim=1) / plan.weights.sum(dim=1, keepdim=True)
    out = x.clone()
    out[torch.arange(x.shape[0], device=x.device), plan.target] = merged.to(x.dtype)
    return out


def compact(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Survivors of groups that all keep the same count: `[G, N, ...]` -> `[G, K, ...]`, order preserved."""
    return x[keep].view(x.shape[0], -1, *x.shape[2:])


def merge_tokens(
    x: torch.Tensor, scores: torch.Tensor, r: int
) -> tuple[torch.Tensor, MergePlan]:
    """One merge step on equal-sized groups: `[G, N, D]` -> `[G, N-r, D]` and the plan it followed."""
    plan = plan_merge(scores, r)
    return compact(apply_merge(x, plan), plan.keep), plan


def update_positions(positions: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Original index of each survivor: `[G, N]` -> `[G, K]` (equal-sized groups)."""
    return compact(positions, plan.keep)


def update_sources(sources: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Re-point `sources [G, N0]` (original token -> current token index) through one merge step."""
    num_groups, num_tokens = plan.keep.shape
    redirect = torch.arange(num_tokens, device=sources.device).repeat(num_groups, 1)
    merged_away = plan.weights[:, :-1] > 0  # members before g_r of each group (rank < r)
    dropped_members = torch.where(merged_away, plan.members[:, :-1], plan.target[:, None])
    redirect.scatter_(1, dropped_members, plan.target[:, None].expand_as(dropped_members))
    new_index = plan.keep.long().cumsum(dim=1) - 1
    return new_index.gather(1, redirect.gather(1, sources))


def initial_sources(num_groups: int, num_tokens: int, device: torch.device | str) -> torch.Tensor:
    return torch.arange(num_tokens, device=device).repeat(num_groups, 1)


def attention_received(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over heads and queries of softmax(q k^T * scale): the attention each token receives.

    `query [G, Hq, N, d]`, `key [G, Hk, N, d]` (Hq a multiple of Hk, for grouped-query attention),
    `valid [G, N]` marks real tokens when groups are padded (padding neither attends nor is attended).
    Queries are processed in chunks so no `[G, H, N, N]` tensor is ever held for large N; the result is fp32
    `[G, N]` and does not depend on the attention backend the model runs.
    """
    num_groups, num_heads, num_tokens, _ = query.shape
    if key.shape[1] != num_heads:
        key = key.repeat_interleave(num_heads // key.shape[1], dim=1)
    key_t = key.float().transpose(-1, -2)
    key_bias = None
    if valid is not None:
        key_bias = torch.zeros(num_groups, 1, 1, num_tokens, device=query.device)
        key_bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
    received = torch.zeros(num_groups, num_tokens, device=query.device)
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, num_groups * num_heads * num_tokens))
    for start in range(0, num_tokens, chunk):
        logits = torch.matmul(query[:, :, start : start + chunk].float(), key_t) * scale
        if key_bias is not None:
            logits = logits + key_bias
        probs = logits.softmax(dim=-1)
        if valid is not None:
            probs = probs * valid[:, None, start : start + chunk, None]
        received += probs.sum(dim=(1, 2))
    queries = valid.sum(dim=1, keepdim=True).float() if valid is not None else float(num_tokens)
    return received / (num_heads * queries)


def last_query_attention(
    query: torch.Tensor, key: torch.Tensor, scale: float, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of one query row per sequence, averaged over query heads: `[B, N]` fp32.

    `query [B, Hq, d]`, `key [B, Hk, N, d]` (Hq a multiple of Hk), `key_valid [B, N]` marks attendable keys.
    """
    num_heads = query.shape[1]
    if key.shape[1] != num_heads:
        key = key.repeat_interleave(num_heads // key.shape[1], dim=1)
    logits = torch.einsum("bhd,bhnd->bhn", query.float(), key.float()) * scale
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


@dataclasses.dataclass
class SpanMerge:
    """Result of merging inside spans of a batch of sequences."""

    hidden: torch.Tensor  # [B, L, D]: targets hold their span's merged value
    keep: torch.Tensor  # [B, L] bool: False where a token was merged away
    representative: torch.Tensor  # [B, L] long: position now standing for each position (itself if kept)


def merge_spans(
    hidden: torch.Tensor, scores: torch.Tensor, span: torch.Tensor, tokens_removed
) -> SpanMerge:
    """Merge inside every span of `hidden [B, L, D]` independently.

    `span [B, L]` holds a span id (>= 0, unique across the batch) for candidate tokens and -1 elsewhere;
    `tokens_removed(n)` is how many tokens a span of n loses. Spans may differ in length.
    """
    batch, length, dim = hidden.shape
    device = hidden.device
    keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    representative = torch.arange(length, device=device).repeat(batch, 1)
    flat_span = span.flatten()
    candidates = (flat_span >= 0).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return SpanMerge(hidden, keep, representative)
    # group the candidates by span, positions ascending inside each span
    candidates = candidates[flat_span[candidates].argsort(stable=True)]
    span_ids, sizes = torch.unique_consecutive(flat_span[candidates], return_counts=True)
    num_spans, longest = span_ids.numel(), int(sizes.max())
    slot = torch.arange(longest, device=device)
    valid = slot[None, :] < sizes[:, None]
    grouped = torch.zeros(num_spans, longest, dtype=torch.long, device=device)
    grouped[valid] = candidates
    r = torch.tensor([tokens_removed(int(size)) for size in sizes.tolist()], device=device)
    if int(r.max()) == 0:
        return SpanMerge(hidden, keep, representative)
    plan = plan_merge(scores.flatten()[grouped], r, valid=valid)
    flat_hidden = hidden.reshape(batch * length, dim)
    merged = apply_merge(flat_hidden[grouped], plan)
    out = flat_hidden.clone()
    target_flat = grouped.gather(1, plan.target[:, None]).squeeze(1)
    out[target_flat] = merged[torch.arange(num_spans, device=device), plan.target]
    dropped = valid & ~plan.keep
    keep.view(-1)[grouped[dropped]] = False
    position = representative.view(-1)
    position[grouped[dropped]] = (target_flat % length)[:, None].expand_as(grouped)[dropped]
    return SpanMerge(out.view(batch, length, dim), keep, representative)
