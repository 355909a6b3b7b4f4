"""The iLLaVA merge step as pure tensor code (no model knowledge).

Tokens come in independent groups (crops, frames, packed segments, LLM visual spans): `x [G, N, D]` with
`scores [G, N]`, optionally a `valid [G, N]` mask when groups of different lengths are padded to N. One step with
count r (per group) removes r tokens; survivors keep their original order. How (`mode`):

- "merge" (the paper's, the default): the r+1 lowest-scored valid tokens g_0 (lowest) .. g_r are chosen; their
  rank-weighted mean sum_k w_k x[g_k] / sum_k w_k, w_k = r+1-k, accumulated in fp32 and cast back to x's dtype,
  replaces x[g_r] (the best-scored member); g_0 .. g_{r-1} are removed.
- "drop" (the reference's mode 1): the r lowest-scored are removed, nothing is merged.
- "shift" (mode 2, no scores): the last token is averaged 1:1 into its predecessor, r times.
- "pivot" (mode 3, pivot / context recycling): see `_plan_pivot`.

Bookkeeping is O(N) per group: `positions` (the original index each survivor sits at), each step's `owner` (the
survivor standing for each token of that step) and, when tracked, `sources` (the same over every step so far: for
each original token, the index of the current token that stands for it).
"""

from __future__ import annotations

import dataclasses
import math

import torch

# Elements of fp32 attention logits materialised at once when scoring in a side pass, on CPU (4 MiB). Measured (one
# thread) at 2304 tokens, 2 and 16 heads: 1.2-2.2x faster than 16 MiB chunks (cache), and a quarter of the memory.
_SCORE_CHUNK_ELEMENTS = 1 << 20
# ... and on an accelerator (64 MiB), where each chunk is a few kernel launches whatever its size: CPU-sized chunks
# would cut one Qwen3-VL-8B merge layer (16 heads, 2304 tokens) into 83 chunks, this budget into 6.
_ACCELERATOR_SCORE_CHUNK_ELEMENTS = 1 << 24
# Devices whose side pass is sized for a cache and takes its softmax in base 2, unnormalised (see `_softmax_chunks`).
_CACHE_BOUND_DEVICES = ("cpu",)
# ... and by `attend_and_score` (2 MiB, one head's rows, the softmax written over its logits): its softmax and the
# output product keep a chunk in cache. A group whose heads' logits all fit in one chunk goes at once.
_FUSED_CHUNK_ELEMENTS = 1 << 19
_LOG2_E = math.log2(math.e)


MODES = ("merge", "drop", "shift", "pivot")


@dataclasses.dataclass
class MergePlan:
    """What one merge step does to each group: which tokens survive, and which survivors (targets) become a
    weighted mean of which tokens (members, the target among them)."""

    keep: torch.Tensor  # [G, N] bool: survivors (valid tokens not merged away)
    targets: torch.Tensor  # [G, T] long: survivors that receive a merged value (T = 0: none, e.g. "drop")
    members: torch.Tensor  # [G, T, M] long: the tokens each target averages
    weights: torch.Tensor  # [G, T, M] fp32: their weights; 0 marks unused entries (and unused targets)
    owner: torch.Tensor  # [G, N] long: the survivor standing for each token (itself if kept), -1 for none


def plan_merge(
    scores: torch.Tensor,
    r: int | torch.Tensor,
    valid: torch.Tensor | None = None,
    mode: str = "merge",
    x: torch.Tensor | None = None,
    pc_ratio: float = 0.05,
) -> MergePlan:
    """Choose, per group, the r tokens to remove and what the survivors become (`mode`, see the module doc).

    `r` is an int or a `[G]` tensor; "merge" needs r+1 valid tokens per group, the others r+1 as well (at least
    one survivor). "pivot" needs the tokens `x [G, N, D]` (it matches removed tokens to centres by similarity).
    """
    if mode not in MODES:
        raise ValueError(f"merge mode {mode!r} is not one of {MODES}")
    num_groups, num_tokens = scores.shape
    device = scores.device
    r_per_group = torch.as_tensor(r, device=device, dtype=torch.long).expand(num_groups)
    valid = torch.ones(num_groups, num_tokens, dtype=torch.bool, device=device) if valid is None else valid
    available = valid.sum(dim=1)
    if bool((r_per_group < 0).any()) or bool((r_per_group + 1 > available).any()):
        raise ValueError(f"merge count r={r_per_group.tolist()} needs r+1 <= tokens per group {available.tolist()}")
    # Ranks: 0 = lowest-scored valid token (ties towards the earlier token), invalid tokens last.
    if mode == "shift":  # position order, no scores
        order = (~valid).long().argsort(dim=1, stable=True)
    else:
        order = scores.detach().float().masked_fill(~valid, float("inf")).argsort(dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_tokens, device=device).expand(num_groups, -1))
    if mode == "merge":
        return _plan_rank_weighted(order, rank, r_per_group, valid)
    if mode == "drop":
        keep = valid & (rank >= r_per_group[:, None])
        empty = torch.zeros(num_groups, 0, dtype=torch.long, device=device)
        owner = torch.where(keep, torch.arange(num_tokens, device=device), -1)
        return MergePlan(keep, empty, empty[..., None], empty[..., None].float(), owner)
    if mode == "shift":
        return _plan_shift(order, rank, r_per_group, available, valid)
    if x is None:
        raise ValueError("merge mode 'pivot' needs the tokens x")
    return _plan_pivot(x, order, rank, r_per_group, available, valid, pc_ratio)


def _plan_rank_weighted(order, rank, r, valid) -> MergePlan:
    """The paper's merge: the r+1 lowest g_0..g_r average into g_r with weights r+1-k; g_0..g_{r-1} go."""
    num_groups, num_tokens = order.shape
    device = order.device
    max_r = int(r.max()) if num_groups else 0
    members = order[:, : max_r + 1]
    weights = (r[:, None] + 1 - torch.arange(max_r + 1, device=device)).clamp(min=0).float()
    targets = members.gather(1, r[:, None])
    dropped = valid & (rank < r[:, None])
    owner = torch.where(dropped, targets, torch.arange(num_tokens, device=device))
    return MergePlan(valid & ~dropped, targets, members[:, None], weights[:, None], owner.masked_fill(~valid, -1))


def _plan_shift(order, rank, r, available, valid) -> MergePlan:
    """Shift-merge: repeatedly average the last token 1:1 into its predecessor. Tokens 0..keep-2 stay; token
    keep-1 becomes h_{keep-1}/2 + sum_{j=keep}^{L-2} h_j/2^(j-keep+2) + h_{L-1}/2^(L-keep)."""
    num_groups, num_tokens = order.shape
    device = order.device
    keep_count = available - r
    max_r = int(r.max()) if num_groups else 0
    step = torch.arange(max_r + 1, device=device)
    member_rank = (keep_count[:, None] - 1 + step).clamp(max=num_tokens - 1)
    members = order.gather(1, member_rank)
    weights = torch.pow(0.5, (step + 1).float()).expand(num_groups, -1).clone()
    last = r[:, None] == step  # the last member shares the smallest weight with the one before it
    weights = torch.where(last, torch.pow(0.5, r.float())[:, None], weights)
    weights = weights.masked_fill(step > r[:, None], 0)
    targets = members[:, :1]
    dropped = valid & (rank >= keep_count[:, None])
    owner = torch.where(dropped, targets, torch.arange(num_tokens, device=device))
    return MergePlan(valid & ~dropped, targets, members[:, None], weights[:, None], owner.masked_fill(~valid, -1))


def _plan_pivot(x, order, rank, r, available, valid, pc_ratio) -> MergePlan:
    """Pivot / context recycling: of the `keep` best, the best keep-pc stay untouched; the other pc become context
    centres, each averaging (1:1) with a similarity-softmax mix of the (at most 5) removed tokens closest to it
    (raw dot products / sqrt(d)). A removed token may feed several centres or none."""
    num_groups, num_tokens = order.shape
    device = order.device
    keep_count = available - r
    centres = torch.round(keep_count.float() * pc_ratio).long().clamp(min=1)
    centres = torch.minimum(centres, keep_count).masked_fill(r == 0, 0)
    removed = rank < r[:, None]  # the r lowest-ranked, all valid
    max_centres = int(centres.max()) if num_groups else 0
    if max_centres == 0:
        empty = torch.zeros(num_groups, 0, dtype=torch.long, device=device)
        owner = torch.arange(num_tokens, device=device).expand(num_groups, -1).masked_fill(~valid, -1)
        return MergePlan(valid.clone(), empty, empty[..., None], empty[..., None].float(), owner)
    # Ranks r .. r+centres-1 are the centres, listed best first; the removed tokens are ranks 0 .. r-1, so only
    # those columns of the similarity are computed (padding: weight 0 for centres, -inf similarity for columns).
    max_r = int(r.max())
    slot = torch.arange(max_centres, device=device)
    target_valid = slot[None, :] < centres[:, None]
    targets = order.gather(1, (r[:, None] + centres[:, None] - 1 - slot).clamp(0, num_tokens - 1))
    candidates = order[:, :max_r]
    candidate_valid = torch.arange(max_r, device=device)[None, :] < r[:, None]
    dim = x.shape[-1]
    similarity = torch.bmm(x.gather(1, targets[..., None].expand(-1, -1, dim)).float(),
                           x.gather(1, candidates[..., None].expand(-1, -1, dim)).float().transpose(1, 2))
    similarity = similarity.div_(dim**0.5).masked_fill_(~candidate_valid[:, None, :], float("-inf"))
    values, picked_column = similarity.topk(min(5, max_r), dim=-1)
    usable = values.isfinite() & target_valid[..., None]
    mix = values.masked_fill(~usable, float("-inf")).softmax(dim=-1).nan_to_num(0.0) * 0.5
    picked = candidates.gather(1, picked_column.flatten(1)).view_as(picked_column)
    members = torch.cat((targets[..., None], picked), dim=-1)
    # half for the centre, half for the mix; a centre with nothing to mix stays itself (padding: weight 0)
    centre_weight = target_valid.float() * torch.where(usable.any(-1), 0.5, 1.0)
    weights = torch.cat((centre_weight[..., None], mix), dim=-1)
    # each removed token is represented by the centre that gives it the largest weight, if any
    contribution = torch.zeros(num_groups, max_centres, max_r, device=device).scatter_add_(2, picked_column, mix)
    best_weight, best_centre = contribution.max(dim=1)
    represented_by = torch.where(best_weight > 0, targets.gather(1, best_centre), -1)
    owner = torch.arange(num_tokens, device=device).expand(num_groups, -1).clone()
    owner.scatter_(1, candidates, torch.where(candidate_valid, represented_by, candidates))
    return MergePlan(valid & ~removed, targets, members, weights, owner.masked_fill_(~valid, -1))


def apply_merge(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """`x [G, N, D]` with each target replaced by its weighted mean, accumulated in fp32 (still `[G, N, D]`)."""
    num_groups, num_targets, num_members = plan.members.shape
    if num_targets == 0:
        return x
    index = plan.members.reshape(num_groups, num_targets * num_members)[..., None].expand(-1, -1, x.shape[-1])
    gathered = x.gather(1, index).float().view(num_groups, num_targets, num_members, -1)
    total = plan.weights.sum(dim=-1)
    merged = (gathered * plan.weights[..., None]).sum(dim=2) / total.clamp(min=1e-30)[..., None]
    out = x.clone()
    groups, slots = (total > 0).nonzero(as_tuple=True)
    out[groups, plan.targets[groups, slots]] = merged[groups, slots].to(x.dtype)
    return out


def compact(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Survivors of groups that all keep the same count: `[G, N, ...]` -> `[G, K, ...]`, order preserved."""
    return x[keep].view(x.shape[0], -1, *x.shape[2:])


def merge_tokens(
    x: torch.Tensor, scores: torch.Tensor, r: int, mode: str = "merge", pc_ratio: float = 0.05
) -> tuple[torch.Tensor, MergePlan]:
    """One merge step on equal-sized groups: `[G, N, D]` -> `[G, N-r, D]` and the plan it followed."""
    plan = plan_merge(scores, r, mode=mode, x=x, pc_ratio=pc_ratio)
    return compact(apply_merge(x, plan), plan.keep), plan


def update_positions(positions: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Original index of each survivor: `[G, N]` -> `[G, K]` (equal-sized groups)."""
    return compact(positions, plan.keep)


def update_sources(sources: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Re-point `sources [G, N0]` (original token -> current token index, -1: no token stands for it) through
    one merge step."""
    new_index = plan.keep.long().cumsum(dim=1) - 1
    owner = torch.where(plan.owner >= 0, new_index.gather(1, plan.owner.clamp(min=0)), -1)
    return torch.where(sources >= 0, owner.gather(1, sources.clamp(min=0)), -1)


def initial_sources(num_groups: int, num_tokens: int, device: torch.device | str) -> torch.Tensor:
    return torch.arange(num_tokens, device=device).repeat(num_groups, 1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotating the two halves of the last dimension (the Llama / Qwen convention).
    Where `cos` / `sin` are narrower than `x` (partial rotary, Qwen3.5), only the first dimensions they cover are
    rotated and the rest pass unchanged."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


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
    received = torch.zeros(num_groups, num_heads, 1, num_tokens, device=query.device)
    for weights, row_weight in _softmax_chunks(query, key, scale, valid):
        if row_weight is None:
            received.add_(weights.sum(dim=-2, keepdim=True))
        else:
            received.add_(torch.matmul(row_weight.transpose(-1, -2), weights))
    queries = valid.sum(dim=1, keepdim=True).float() if valid is not None else float(num_tokens)
    return received.sum(dim=(1, 2)) / (num_heads * queries)


def attend_and_score(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output softmax(q k^T * scale) v and the attention each token receives, from one pass.

    For a layer that both attends and is scored: the probabilities are computed once, in fp32, for the output and
    the scores. `query [G, Hq, N, d]`, `key/value [G, Hk, N, d]` (Hq a multiple of Hk; no padding). Returns the
    output `[G, N, Hq, d]` in value's dtype (the layout attention implementations return) and the received
    attention `[G, N]` fp32, summed over queries and averaged over heads (`attention_received` times N).
    Inference only: its products write in place, which autograd refuses.
    """
    num_groups, num_heads, num_tokens, _ = query.shape
    heads_per_kv = num_heads // key.shape[1]
    output = torch.empty(num_groups, num_tokens, num_heads, value.shape[-1], dtype=value.dtype, device=query.device)
    received = torch.zeros(num_groups, num_tokens, device=query.device)
    if num_heads * num_tokens * num_tokens <= _FUSED_CHUNK_ELEMENTS:
        # small groups (Qwen2.5-VL's attention windows, one call each): all heads at once, in as few operations as
        # possible, since their per-call cost outweighs the arithmetic
        for group in range(num_groups):
            group_key, group_value = key[group].float(), value[group].float()
            if heads_per_kv > 1:
                group_key = group_key.repeat_interleave(heads_per_kv, dim=0)
                group_value = group_value.repeat_interleave(heads_per_kv, dim=0)
            probs = torch.matmul(query[group].float(), group_key.transpose(1, 2)).mul_(scale).softmax(dim=-1)
            output[group] = torch.bmm(probs, group_value).transpose(0, 1)
            torch.sum(probs, dim=(0, 1), out=received[group])
        return output, received.div_(num_heads)
    # large groups: the softmax in base 2 with log2(e) folded into the scale (exp2 costs a third of exp on CPU)
    scale = scale * _LOG2_E
    rows = max(1, min(num_tokens, _FUSED_CHUNK_ELEMENTS // num_tokens))
    logits = torch.empty(rows, num_tokens, device=query.device)  # then the unnormalised probabilities, in place
    head_output = torch.empty(rows, value.shape[-1], device=query.device)
    # per head and chunk, 2-D products into preallocated buffers: on CPU 10% faster than batched matmuls over
    # [G, H, rows, N] chunks followed by copies (one thread, 2304 tokens, 2 heads of 72)
    for group in range(num_groups):
        for head in range(num_heads):
            head_query = query[group, head].float()
            key_t = key[group, head // heads_per_kv].float().t()
            head_value = value[group, head // heads_per_kv].float()
            for start in range(0, num_tokens, rows):
                stop = min(num_tokens, start + rows)
                chunk, chunk_output = logits[: stop - start], head_output[: stop - start]
                torch.addmm(chunk, head_query[start:stop], key_t, beta=0, alpha=scale, out=chunk)
                row_weight = _exp2_softmax_rows(chunk)
                torch.mm(chunk, head_value, out=chunk_output)
                torch.mul(chunk_output, row_weight, out=output[group, start:stop, head])
                received[group].addmv_(chunk.t(), row_weight.squeeze(1))
    return output, received.div_(num_heads)


def _exp2_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits [..., n]` (in log2 units) -> 2^(logits - row max) in place; returns the `[..., 1]` row weights
    1 / row sum that normalise them. The caller folds the weights into the products it takes (the output rows, the
    column sums) instead of a pass over the probabilities."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp2_()
    return logits.sum(dim=-1, keepdim=True).reciprocal_()


def _softmax_chunks(query, key, scale, valid=None):
    """`(probabilities, row weights)` over chunks of query rows, fp32, whose row-weighted sums over queries add up to
    the attention received; no chunk exceeds the device's budget (`_SCORE_CHUNK_ELEMENTS` on CPU,
    `_ACCELERATOR_SCORE_CHUNK_ELEMENTS` elsewhere). On CPU the probabilities are exp(logits - row max), taken as exp2
    of logits in log2 units, with row weights 1 / row sum: the softmax in place, never normalised in a pass of its own.
    On an accelerator, where the passes over the logits rather than the arithmetic set the cost, the normalised
    softmax of one fused kernel, with row weights None (all 1). The scale multiplies the query rows, not the logits.
    Padded queries (`valid`) get row weight 0; padded keys get probability 0."""
    num_groups, num_heads, num_tokens, _ = query.shape
    if key.shape[1] != num_heads:
        key = key.repeat_interleave(num_heads // key.shape[1], dim=1)
    key_t = key.float().transpose(-1, -2)
    key_bias = None
    if valid is not None:
        key_bias = torch.zeros(num_groups, 1, 1, num_tokens, device=query.device)
        key_bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
    in_base_2 = query.device.type in _CACHE_BOUND_DEVICES
    budget = _SCORE_CHUNK_ELEMENTS if in_base_2 else _ACCELERATOR_SCORE_CHUNK_ELEMENTS
    query_scale = scale * _LOG2_E if in_base_2 else scale
    chunk = max(1, budget // max(1, num_groups * num_heads * num_tokens))
    for start in range(0, num_tokens, chunk):
        weights = torch.matmul(query[:, :, start : start + chunk].float() * query_scale, key_t)
        if key_bias is not None:
            weights.add_(key_bias)
        if in_base_2:
            row_weight = _exp2_softmax_rows(weights)
        else:
            weights, row_weight = weights.softmax(dim=-1), None
        if valid is not None:
            row_valid = valid[:, None, start : start + chunk, None]
            row_weight = row_valid.float() if row_weight is None else row_weight.mul_(row_valid)
        yield weights, row_weight
        del weights


def last_query_attention(
    query: torch.Tensor, key: torch.Tensor, scale: float, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of one query row per sequence, averaged over query heads: `[B, N]` fp32.

    `query [B, Hq, d]`, `key [B, Hk, N, d]` (Hq a multiple of Hk), `key_valid [B, N]` marks attendable keys.
    """
    batch, num_heads, dim = query.shape
    kv_heads = key.shape[1]
    # query heads grouped by the key head they share: [B, Hk, Hq/Hk, d] against [B, Hk, N, d], no repeated keys
    grouped = query.float().view(batch, kv_heads, num_heads // kv_heads, dim)
    logits = torch.matmul(grouped, key.float().transpose(-1, -2)).mul_(scale)
    if key_valid is not None:
        logits.masked_fill_(~key_valid[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))


@dataclasses.dataclass
class SpanMerge:
    """Result of merging inside spans of a batch of sequences."""

    hidden: torch.Tensor  # [B, L, D]: targets hold their span's merged value
    keep: torch.Tensor  # [B, L] bool: False where a token was merged away
    owner: torch.Tensor  # [B, L] long: position now standing for each position (itself if kept)


def merge_spans(
    hidden: torch.Tensor, scores: torch.Tensor, span: torch.Tensor, tokens_removed, mode: str = "merge",
    pc_ratio: float = 0.05,
) -> SpanMerge:
    """Merge inside every span of `hidden [B, L, D]` independently.

    `span [B, L]` holds a span id (>= 0, unique across the batch) for candidate tokens and -1 elsewhere;
    `tokens_removed(n)` is how many tokens a span of n loses. Spans may differ in length.
    """
    batch, length, dim = hidden.shape
    device = hidden.device
    keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    owner = torch.arange(length, device=device).repeat(batch, 1)
    flat_span = span.flatten()
    candidates = (flat_span >= 0).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return SpanMerge(hidden, keep, owner)
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
        return SpanMerge(hidden, keep, owner)
    flat_hidden = hidden.reshape(batch * length, dim)
    grouped_hidden = flat_hidden[grouped]
    plan = plan_merge(scores.flatten()[grouped], r, valid=valid, mode=mode, x=grouped_hidden, pc_ratio=pc_ratio)
    merged = apply_merge(grouped_hidden, plan)
    out = flat_hidden.clone()
    out[grouped[valid]] = merged[valid]
    dropped = valid & ~plan.keep
    keep.view(-1)[grouped[dropped]] = False
    owner_position = torch.where(plan.owner >= 0, grouped.gather(1, plan.owner.clamp(min=0)) % length, -1)
    owner.view(-1)[grouped[dropped]] = owner_position[dropped]
    return SpanMerge(out.view(batch, length, dim), keep, owner)
