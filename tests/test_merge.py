import pytest
import torch

from illava import merge


def test_rank_weights_target_and_order():
    x = torch.arange(6, dtype=torch.float32)[None, :, None] * torch.ones(1, 6, 2)  # token i has value i
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.2, 0.3, 0.8]])
    merged, plan = merge.merge_tokens(x, scores, r=2)
    # lowest three, lowest first: token 1 (w=3), token 3 (w=2), token 4 (w=1); token 4 receives the mean
    assert plan.members[0, 0].tolist() == [1, 3, 4]
    assert plan.weights[0, 0].tolist() == [3.0, 2.0, 1.0]
    assert plan.targets.tolist() == [[4]]
    expected_mean = (3 * 1 + 2 * 3 + 1 * 4) / 6
    # survivors in original order: 0, 2, 4 (merged), 5
    assert merged[0, :, 0].tolist() == pytest.approx([0.0, 2.0, expected_mean, 5.0])
    assert plan.keep[0].tolist() == [True, False, True, False, True, True]


def test_r_zero_is_identity():
    x = torch.randn(3, 7, 4)
    merged, plan = merge.merge_tokens(x, torch.rand(3, 7), r=0)
    assert torch.equal(merged, x)


def test_groups_never_mix():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 8)
    scores = torch.rand(2, 10)
    merged, _ = merge.merge_tokens(x, scores, r=4)
    x_changed, scores_changed = x.clone(), scores.clone()
    x_changed[1] = torch.randn(10, 8) * 100
    scores_changed[1] = torch.rand(10)
    merged_changed, _ = merge.merge_tokens(x_changed, scores_changed, r=4)
    assert torch.equal(merged[0], merged_changed[0])
    assert not torch.equal(merged[1], merged_changed[1])


def test_bf16_accumulates_in_fp32_and_returns_bf16():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 256).to(torch.bfloat16)
    scores = torch.arange(64.0)[None]  # token i has rank i
    merged, _ = merge.merge_tokens(x, scores, r=63)
    assert merged.dtype == torch.bfloat16 and merged.shape == (1, 1, 256)
    weights = torch.arange(64, 0, -1, dtype=torch.float32)
    fp32_mean = (x[0].float() * weights[:, None]).sum(0) / weights.sum()
    assert torch.equal(merged[0, 0], fp32_mean.to(torch.bfloat16))
    # accumulating in bf16 instead would round the running sums and land elsewhere for some channels
    running = torch.zeros(256, dtype=torch.bfloat16)
    for weight, row in zip(weights.to(torch.bfloat16), x[0]):
        running = running + weight * row
    assert not torch.equal(running / weights.sum().to(torch.bfloat16), merged[0, 0])


def test_variable_r_and_padding_mask():
    x = torch.arange(12, dtype=torch.float32).view(2, 6, 1)
    scores = torch.tensor([[0.3, 0.1, 0.2, 0.9, 0.0, 0.0], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    valid = torch.tensor([[True, True, True, True, False, False], [True] * 6])
    plan = merge.plan_merge(scores, torch.tensor([1, 2]), valid=valid)
    # group 0: padding (score 0) is never chosen; lowest two valid are 1 (w=2) then 2 (w=1)
    assert plan.keep[0].tolist() == [True, False, True, True, False, False]
    assert plan.targets.tolist() == [[2], [3]]
    out = merge.apply_merge(x, plan)
    assert out[0, 2, 0].item() == pytest.approx((2 * 1 + 1 * 2) / 3)
    assert out[1, 3, 0].item() == pytest.approx((3 * 11 + 2 * 10 + 1 * 9) / 6)
    assert plan.keep.sum(dim=1).tolist() == [3, 4]


def test_too_large_r_is_refused():
    with pytest.raises(ValueError, match="r=\\[5\\]"):
        merge.plan_merge(torch.rand(1, 5), 5)


def test_sources_follow_every_merge():
    torch.manual_seed(1)
    groups, tokens = 3, 20
    x = torch.randn(groups, tokens, 4)
    positions = merge.initial_sources(groups, tokens, "cpu")
    sources = positions.clone()
    # reference: an explicit N x N membership matrix, merged by hand
    membership = torch.eye(tokens).repeat(groups, 1, 1)  # [G, current, original]
    for r in (3, 5, 2):
        scores = torch.rand(groups, x.shape[1])
        plan = merge.plan_merge(scores, r)
        x = merge.compact(merge.apply_merge(x, plan), plan.keep)
        positions = merge.update_positions(positions, plan)
        sources = merge.update_sources(sources, plan)
        for g in range(groups):
            for member in plan.members[g, 0, :r]:
                membership[g, plan.targets[g, 0]] += membership[g, member]
        membership = membership[plan.keep].view(groups, -1, tokens)
    assert sources.shape == (groups, tokens)
    assert torch.equal(membership.argmax(dim=1), sources)
    assert torch.equal(membership.sum(dim=1), torch.ones(groups, tokens))
    # every survivor stands for its own original position
    assert torch.equal(sources.gather(1, positions), torch.arange(positions.shape[1]).expand_as(positions))


def _eager_received(query, key, scale):
    probs = (query @ key.transpose(-1, -2) * scale).softmax(dim=-1)
    return probs.mean(dim=(1, 2))


# the side pass's two ways: CPU's (cache-sized chunks, softmax in base 2 left unnormalised) and an accelerator's
# (large chunks, fused softmax), both run here on CPU
SIDE_PASS_WAYS = pytest.mark.parametrize("cache_bound_devices", [("cpu",), ()], ids=["cpu-way", "accelerator-way"])


@SIDE_PASS_WAYS
@pytest.mark.parametrize("tokens", [5, 300])
def test_attention_received_matches_full_softmax(monkeypatch, tokens, cache_bound_devices):
    monkeypatch.setattr(merge, "_CACHE_BOUND_DEVICES", cache_bound_devices)
    torch.manual_seed(0)
    query, key = torch.randn(2, 3, tokens, 8), torch.randn(2, 3, tokens, 8)
    for budget in ("_SCORE_CHUNK_ELEMENTS", "_ACCELERATOR_SCORE_CHUNK_ELEMENTS"):
        monkeypatch.setattr(merge, budget, 2 * 3 * tokens * 7)  # force several query chunks
    received = merge.attention_received(query, key, 8**-0.5)
    torch.testing.assert_close(received, _eager_received(query, key, 8**-0.5))
    torch.testing.assert_close(received.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("device, chunks", [("cpu", 83), ("meta", 6)])
def test_side_pass_chunks_are_sized_for_the_device(device, chunks):
    # Qwen3-VL-8B's merge layers: 16 heads, 2304 tokens; off the CPU each chunk is launch-bound, so fewer and larger
    query = torch.zeros(1, 16, 2304, 72, device=device)
    assert len(list(merge._softmax_chunks(query, query, 0.1))) == chunks


@SIDE_PASS_WAYS
def test_attention_received_grouped_query_and_padding(monkeypatch, cache_bound_devices):
    monkeypatch.setattr(merge, "_CACHE_BOUND_DEVICES", cache_bound_devices)
    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    valid = torch.tensor([[True, True, True, True, False, False]])
    received = merge.attention_received(query, key, 0.3, valid=valid)
    expected = _eager_received(query[:, :, :4], key.repeat_interleave(2, dim=1)[:, :, :4], 0.3)
    torch.testing.assert_close(received[:, :4], expected)
    assert received[0, 4:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("heads, kv_heads, dtype", [(3, 3, torch.float32), (4, 2, torch.float32),
                                                    (4, 2, torch.bfloat16)])
@pytest.mark.parametrize("chunk", [50 * 7, None], ids=["query-chunks", "all-heads-at-once"])
def test_attend_and_score_is_attention_and_its_received_mass(monkeypatch, heads, kv_heads, dtype, chunk):
    torch.manual_seed(0)
    # logits up to ~200: the softmax must subtract each row's maximum
    query, key, value = (torch.randn(2, kv, 50, dim).mul(scale).to(dtype)
                         for kv, dim, scale in ((heads, 8, 8.0), (kv_heads, 8, 8.0), (kv_heads, 6, 1.0)))
    if chunk is not None:
        monkeypatch.setattr(merge, "_FUSED_CHUNK_ELEMENTS", chunk)  # several query chunks, the last one shorter
    output, received = merge.attend_and_score(query, key, value, 0.3)
    assert output.dtype == dtype and received.dtype == torch.float32
    query, key, value = query.float(), key.float(), value.float()
    key, value = key.repeat_interleave(heads // kv_heads, dim=1), value.repeat_interleave(heads // kv_heads, dim=1)
    probs = (query @ key.transpose(-1, -2) * 0.3).softmax(dim=-1)
    # fp32 rounding of logits of ~100 moves probabilities by ~1e-5 relative
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(output, (probs @ value).transpose(1, 2).to(dtype), **tolerance)
    torch.testing.assert_close(received, probs.sum(dim=2).mean(dim=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(received, merge.attention_received(query, key, 0.3) * 50)


# -- the reference's modes: drop (1), shift (2), pivot (3) ---------------------------------------------------


def test_drop_keeps_the_best_unchanged_and_no_survivor_stands_for_the_dropped():
    x = torch.arange(6, dtype=torch.float32)[None, :, None]
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.2, 0.3, 0.8]])
    merged, plan = merge.merge_tokens(x, scores, r=2, mode="drop")
    assert merged[0, :, 0].tolist() == [0.0, 2.0, 4.0, 5.0]
    assert plan.owner[0].tolist() == [0, -1, 2, -1, 4, 5]
    sources = merge.update_sources(merge.initial_sources(1, 6, "cpu"), plan)
    assert sources[0].tolist() == [0, -1, 1, -1, 2, 3]


def test_shift_averages_the_tail_into_the_last_kept_token():
    x = torch.arange(6, dtype=torch.float32)[None, :, None] ** 2  # scores play no part
    merged, plan = merge.merge_tokens(x, torch.rand(1, 6), r=3, mode="shift")
    h = x[0, :, 0].tolist()
    # keep = 3: tokens 0, 1 unchanged; token 2 = h2/2 + h3/4 + h4/8 + h5/8 (averaging the last into its predecessor)
    assert merged[0, :, 0].tolist() == pytest.approx([h[0], h[1], h[2] / 2 + h[3] / 4 + h[4] / 8 + h[5] / 8])
    assert plan.owner[0].tolist() == [0, 1, 2, 2, 2, 2]
    step_by_step = list(h)
    while len(step_by_step) > 3:
        last = step_by_step.pop()
        step_by_step[-1] = (step_by_step[-1] + last) / 2
    assert merged[0, :, 0].tolist() == pytest.approx(step_by_step)


def test_shift_and_drop_respect_padding_and_per_group_counts():
    x = torch.arange(12, dtype=torch.float32).view(2, 6, 1)
    scores = torch.tensor([[0.3, 0.1, 0.2, 0.9, 0.0, 0.0], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    valid = torch.tensor([[True, True, True, True, False, False], [True] * 6])
    shift = merge.plan_merge(scores, torch.tensor([1, 2]), valid=valid, mode="shift")
    assert shift.keep.tolist() == [[True, True, True, False, False, False], [True, True, True, True, False, False]]
    out = merge.apply_merge(x, shift)
    assert out[0, 2, 0].item() == pytest.approx((2 + 3) / 2) and out[1, 3, 0].item() == pytest.approx(9 / 2 + 10 / 4 + 11 / 4)
    drop = merge.plan_merge(scores, torch.tensor([1, 2]), valid=valid, mode="drop")
    assert drop.keep.tolist() == [[True, False, True, True, False, False], [True, True, True, True, False, False]]


def test_pivot_keeps_pivots_and_recycles_removed_tokens_into_centres():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 8)
    scores = torch.arange(12, dtype=torch.float32)[None].flip(1)  # token 0 best ... token 11 worst
    r, ratio = 4, 0.3
    merged, plan = merge.merge_tokens(x, scores, r=r, mode="pivot", pc_ratio=ratio)
    keep = 12 - r
    centres = max(1, round(keep * ratio))  # 2: ranks 6, 7 (tokens 6, 7); tokens 8..11 are removed
    assert plan.keep[0].tolist() == [True] * keep + [False] * r
    assert torch.equal(merged[0, : keep - centres], x[0, : keep - centres])  # pivots untouched
    removed = x[0, keep:]
    for centre in range(keep - centres, keep):
        similarity = removed @ x[0, centre] / 8**0.5
        weights = similarity.softmax(dim=0)  # M = min(5, 4) = 4: every removed token
        expected = (x[0, centre] + (weights[:, None] * removed).sum(dim=0)) / 2
        torch.testing.assert_close(merged[0, centre], expected)
    assert set(plan.owner[0, keep:].tolist()) <= {keep - 2, keep - 1}  # each removed token: its heaviest centre


def test_pivot_takes_the_five_closest_removed_tokens():
    x = torch.zeros(1, 10, 2)
    x[0, :, 0] = torch.arange(10, dtype=torch.float32)
    scores = -torch.arange(10, dtype=torch.float32)[None]  # token 0 best
    plan = merge.plan_merge(scores, 7, mode="pivot", x=x, pc_ratio=0.1)  # keep 3, one centre (token 2)
    assert plan.targets.tolist() == [[2]]
    assert sorted(plan.members[0, 0, 1:].tolist()) == [5, 6, 7, 8, 9]  # largest dot products with token 2
    assert plan.owner[0].tolist() == [0, 1, 2, -1, -1, 2, 2, 2, 2, 2]  # tokens 3 and 4 feed no centre


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="merge mode 'squash'"):
        merge.plan_merge(torch.rand(1, 5), 1, mode="squash")
