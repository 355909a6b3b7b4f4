"""Qwen3-VL / Qwen3-VL-MoE: window merging per image / frame, DeepStack features that follow the merges, true
M-RoPE positions with the video timestamps kept, the LLM stage in the Qwen3 decoder (q/k norms, DeepStack) and in
Qwen3.5's hybrid decoder (linear-attention layers, gated full attention with partial rotary).
(Off, r=0, remove, copies and bad settings on every family, Qwen3.5 and the MoE included: `test_contract.py`.)"""

import pytest
import torch
from transformers.video_utils import VideoMetadata

import illava
from illava import compat
from illava.visualize.sources import write_heatmaps

from .conftest import QWEN_IMAGE as IMAGE
from .conftest import QWEN_VIDEO as VIDEO
from .conftest import QWEN_VIT as VIT
from .conftest import capture_positions, random_image, random_video, tiny_qwen3


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def qwen3(request):
    """Vision depth 6 with DeepStack from blocks 1, 3, 4 (injected after decoder layers 0, 1, 2); 6 text layers."""
    return tiny_qwen3(moe=request.param)


def metadata(video):
    return VideoMetadata(total_num_frames=len(video), fps=2.0, frames_indices=list(range(len(video))))


def encode(processor, images=(), videos=(), text="describe"):
    prompt = IMAGE * len(images) + VIDEO * len(videos) + text
    extra = dict(video_metadata=[metadata(video) for video in videos]) if videos else {}
    return processor(images=list(images) or None, videos=list(videos) or None, text=prompt, return_tensors="pt", **extra)


def sample_inputs(processor):
    return encode(processor, [random_image(100, 150)], [random_video(4, 84, 112)])


def test_window_counts_per_image_and_frame_and_placeholders(qwen3):
    model, processor = qwen3
    with illava.applied(model, processor=processor, **VIT):
        inputs = sample_inputs(processor)
        output = model(**inputs)
        image, video = illava.last_trace(model).vision
    # image: 6x10 patches = 3x5 windows = 15; video: 2 temporal slices of 3x4 windows = 12 each
    assert (image.modality, image.grid, image.tokens_per_group) == ("image", (3, 5), [15, 12, 9])
    assert (video.modality, video.grid, video.groups_per_item) == ("video", (3, 4), [2])
    assert video.tokens_per_group == [12, 9, 6] and video.positions.shape == (2, 6)
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == 9
    assert int((ids == model.config.video_token_id).sum()) == 12
    assert output.logits.shape[1] == ids.numel()
    text = processor.tokenizer.decode(ids)
    assert text.count("seconds>") == 2 and text.count("<|video_pad|>" * 6 + "<|vision_end|>") == 2


def test_fraction_r_is_a_fraction_of_windows(qwen3):
    model, processor = qwen3
    with illava.applied(model, processor=processor, enable_illava_vit=True, illava_vit_k="2-3-4", illava_vit_r=0.2):
        model(**encode(processor, [random_image(100, 150)]))
        assert illava.last_trace(model).vision[0].tokens_per_group == [15, 12, 10, 8]


def test_a_video_is_encoded_once_as_a_video(qwen3):
    model, processor = qwen3
    with illava.applied(model, processor=processor, **VIT):
        model(**encode(processor, videos=[random_video(4, 84, 112)]))
        trace = illava.last_trace(model)
    assert [entry.modality for entry in trace.vision] == ["video"]
    assert trace.tokens_per_item["video"] == [12] and not trace.tokens_per_item["image"]


def unpatched_deepstack(model, inputs):
    with torch.no_grad():
        output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return [level[0] for level in output.deepstack_features]


def test_deepstack_features_follow_the_merges(qwen3):
    """Block 1's features are taken before the merge in block 2: with "drop" they are the unmerged features of the
    surviving windows; with the rank-weighted merge (r=1: the lowest window, weight 2, into the next, weight 1)
    the survivor's row is that weighted mean. Blocks 3 and 4 come after the merge: one row per survivor."""
    model, processor = qwen3
    inputs = encode(processor, [random_image(100, 150)])
    full = unpatched_deepstack(model, inputs)
    for mode in ("drop", "merge"):
        with illava.applied(model, processor=processor, enable_illava_vit=True, illava_vit_k="2", illava_vit_r=1,
                            illava_vit_mode=mode, illava_track_vit_source=True):
            levels = unpatched_deepstack(model, inputs)
            entry = illava.last_trace(model).vision[0]
        survivors = entry.positions[0]
        assert [level.shape[0] for level in levels] == [14, 14, 14]
        expected = full[0][survivors].clone()
        if mode == "merge":
            (merged_away,) = set(range(15)) - set(survivors.tolist())
            target = int(entry.sources[0][merged_away])  # the survivor it went into
            expected[target] = (2 * full[0][merged_away] + full[0][survivors[target]]) / 3
        torch.testing.assert_close(levels[0], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(levels[1], full[1][survivors], atol=1e-4)  # computed after the merge


def test_survivors_keep_their_true_positions_and_the_timestamps_stay(qwen3):
    model, processor = qwen3
    full_inputs = sample_inputs(processor)
    full_ids = full_inputs["input_ids"][0]
    full_positions, full_deltas = model.model.get_rope_index(
        full_inputs["input_ids"], full_inputs["mm_token_type_ids"], full_inputs["image_grid_thw"],
        full_inputs["video_grid_thw"], attention_mask=full_inputs["attention_mask"],
    )
    tokens = (model.config.image_token_id, model.config.video_token_id)
    with illava.applied(model, processor=processor, **VIT):
        inputs = sample_inputs(processor)
        ids = inputs["input_ids"][0]
        for run in ("forward", "generate"):
            seen, handle = capture_positions(model)
            try:
                if run == "forward":
                    model(**inputs)
                else:
                    model.generate(**inputs, max_new_tokens=2, do_sample=False)
            finally:
                handle.remove()
            positions = seen["position_ids"][-3:, 0]
            for token_id, entry in zip(tokens, illava.last_trace(model).vision):
                windows = entry.grid[0] * entry.grid[1]
                kept = (torch.arange(entry.positions.shape[0])[:, None] * windows + entry.positions).flatten()
                expected = full_positions[:, 0, (full_ids == token_id).nonzero().flatten()[kept]]
                assert torch.equal(positions[:, ids == token_id], expected), run
            text, full_text = (~torch.isin(row, torch.tensor(tokens)) for row in (ids, full_ids))
            assert torch.equal(ids[text], full_ids[full_text])  # timestamps, vision start / end, prompt
            assert torch.equal(positions[:, text], full_positions[:, 0, full_text]), run
        assert torch.equal(model.model.rope_deltas, full_deltas + (full_ids.numel() - ids.numel()))


@pytest.mark.parametrize("options", [dict(num_beams=2, num_return_sequences=2), dict(num_return_sequences=2, do_sample=True)])
def test_generate_that_repeats_rows_gives_each_row_the_prompts_positions(qwen3, options):
    model, processor = qwen3
    with illava.applied(model, processor=processor, **VIT):
        inputs = sample_inputs(processor)
        seen, handle = capture_positions(model)
        try:
            model(**inputs)
            alone = seen["position_ids"][-3:]
            torch.manual_seed(0)
            output = model.generate(**inputs, max_new_tokens=2, **options)
        finally:
            handle.remove()
    assert output.shape[0] == 2
    assert torch.equal(seen["position_ids"][-3:], alone.expand(-1, 2, -1))


def test_llm_scores_are_the_last_token_attention_after_the_qk_norms(qwen3):
    """The decoder merger's scores equal eager attention probabilities of the last token (mean over heads)."""
    model, processor = qwen3
    inputs = encode(processor, [random_image(100, 150)])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        probabilities = attentions[2][0, :, -1].mean(0)  # layer 2 scores the merge before layer 3
        with illava.applied(model, processor=processor, enable_illava_llm=True, illava_llm_k="3", illava_llm_r=3,
                            illava_llm_mode="drop"):
            model(**inputs)
            kept = illava.last_trace(model).language[0].kept_positions(0)
    finally:
        model.set_attn_implementation("sdpa")
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    last = int(visual[-1])
    candidates = visual[visual != last]
    dropped = set(visual.tolist()) - set(kept.tolist())
    expected = candidates[probabilities[candidates].argsort()[:3]]
    assert dropped == set(expected.tolist())


def test_llm_merge_before_the_deepstack_layers_injects_at_the_kept_positions(qwen3, monkeypatch):
    model, processor = qwen3
    language = model.model.language_model
    calls, given = [], {}
    original = type(language)._deepstack_process

    def spy(self, hidden_states, visual_pos_masks, visual_embeds):
        calls.append((visual_pos_masks.clone(), visual_embeds.clone()))
        return original(self, hidden_states, visual_pos_masks, visual_embeds)

    def remember(module, args, kwargs):
        if kwargs.get("deepstack_visual_embeds") is not None:
            given.update(mask=kwargs["visual_pos_masks"], embeds=kwargs["deepstack_visual_embeds"])

    monkeypatch.setattr(type(language), "_deepstack_process", spy)
    handle = language.register_forward_pre_hook(remember, with_kwargs=True)
    try:
        with illava.applied(model, processor=processor, **VIT, enable_illava_llm=True, illava_llm_k="1",
                            illava_llm_r=0.5):
            inputs = sample_inputs(processor)
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            replay = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
            calls.clear()
            model(**inputs)
            layout = illava.last_trace(model).language[0].positions[0]
    finally:
        handle.remove()
    assert torch.equal(tokens, replay)
    mask, embeds = given["mask"][0], given["embeds"]
    row_of_position = mask.long().cumsum(0) - 1
    assert torch.equal(calls[0][0][0], mask)  # layer 0 runs before the merge at layer 1
    kept_visual = layout[mask[layout]]
    assert 0 < kept_visual.numel() < int(mask.sum())
    for level in (1, 2):
        kept_mask, kept_embeds = calls[level]
        assert kept_mask.shape[1] == layout.numel() and int(kept_mask.sum()) == kept_visual.numel()
        torch.testing.assert_close(kept_embeds, embeds[level][row_of_position[kept_visual]])


BATCH_SAMPLES = [
    dict(images=[random_image(100, 150, seed=1)], text=IMAGE + "describe"),
    dict(videos=[random_video(4, 84, 112, seed=2)], text=VIDEO + "what happens here"),
    dict(images=[random_image(84, 84, seed=3)], videos=[random_video(2, 84, 112, seed=4)], text=IMAGE + VIDEO + "both"),
]


def generate_batch(model, processor, batch_samples, **extra):
    """Greedy tokens and logits of 4 new tokens for a left-padded batch of samples."""
    images = [image for sample in batch_samples for image in sample.get("images", [])]
    videos = [video for sample in batch_samples for video in sample.get("videos", [])]
    inputs = processor(images=images or None, videos=videos or None, text=[s["text"] for s in batch_samples],
                       padding=True, return_tensors="pt",
                       **(dict(video_metadata=[metadata(video) for video in videos]) if videos else {}))
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **extra)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def assert_cache_matches_replay_and_batch_matches_alone(model, processor, tokens, logits):
    replay_tokens, replay_logits = generate_batch(model, processor, BATCH_SAMPLES, use_cache=False)
    assert torch.equal(tokens, replay_tokens)
    torch.testing.assert_close(logits, replay_logits, rtol=1e-4, atol=1e-4)
    for index, sample in enumerate(BATCH_SAMPLES):
        alone_tokens, alone_logits = generate_batch(model, processor, [sample])
        assert torch.equal(tokens[index], alone_tokens[0])
        torch.testing.assert_close(logits[index], alone_logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_generate_both_stages_batch_matches_alone_and_cache_matches_replay(backend, moe):
    model, processor = tiny_qwen3(attn_implementation=backend, seed=4, moe=moe)
    options = dict(VIT, enable_illava_llm=True, illava_llm_k="2-4", illava_llm_r=0.8)
    with illava.applied(model, processor=processor, **options):
        tokens, logits = generate_batch(model, processor, BATCH_SAMPLES)
        assert len(illava.last_trace(model).language) == 2
        assert_cache_matches_replay_and_batch_matches_alone(model, processor, tokens, logits)


@pytest.mark.parametrize("mode", ["drop", "shift", "pivot"])
def test_modes_give_the_counts_of_the_default_merge(qwen3, mode, tmp_path):
    model, processor = qwen3
    results = {}
    for name in ("merge", mode):
        with illava.applied(model, processor=processor, **VIT, enable_illava_llm=True, illava_llm_k="3-4",
                            illava_llm_r=0.5, illava_vit_mode=name, illava_llm_mode=name, illava_pc_ratio=0.3,
                            illava_track_vit_source=True, illava_track_llm_source=True):
            inputs = sample_inputs(processor)
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            trace = illava.last_trace(model)
            results[name] = ([entry.tokens_per_group for entry in trace.vision],
                             [layer.visual_tokens_per_span for layer in trace.language])
            assert write_heatmaps(model, processor, inputs, trace, tmp_path / name)
    assert results[mode] == results["merge"]


def test_too_large_r_names_the_value_and_the_grid(qwen3):
    model, processor = qwen3
    with illava.applied(model, processor=processor, enable_illava_vit=True, illava_vit_k="2", illava_vit_r=12):
        with pytest.raises(ValueError, match="illava_vit_r=12 leaves no token in an image/frame of 3x4"):
            model(**encode(processor, [random_image(84, 112)]))


def test_moe_router_logits_are_refused_with_the_llm_stage():
    model, processor = tiny_qwen3(moe=True, text_layers=4)
    inputs = encode(processor, [random_image(84, 84)])
    with illava.applied(model, processor=processor, enable_illava_llm=True, illava_llm_k="3"):
        with pytest.raises(ValueError, match="output_router_logits=True"):
            model(**inputs, output_router_logits=True)
        model(**inputs)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_qwen3_5_vit_stage(moe, tmp_path):
    model, processor = tiny_qwen3(qwen3_5=True, moe=moe, text_layers=4)
    with illava.applied(model, processor=processor, illava_track_vit_source=True, **VIT):
        inputs = sample_inputs(processor)
        model(**inputs)
        written = write_heatmaps(model, processor, inputs, illava.last_trace(model), tmp_path)
        assert len(written) == 2 and all(path.name.startswith("attention_map_vit_layer_") for path in written)
        tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert torch.equal(tokens, model.generate(**inputs, max_new_tokens=2, do_sample=False, use_cache=False))
        image, video = illava.last_trace(model).vision
    assert image.tokens_per_group == [15, 12, 9] and video.tokens_per_group == [12, 9, 6]
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 12


# -- Qwen3.5: the LLM stage in a decoder of linear-attention layers 0-2, 4-6 and full attention at 3, 7 ------------


def tiny_qwen3_5(moe=False, backend="sdpa", seed=0):
    """8 text layers; M-RoPE rotates half of each head (real checkpoints: a quarter), the rest passes."""
    return tiny_qwen3(qwen3_5=True, moe=moe, text_layers=8, rotary_fraction=0.5, attn_implementation=backend,
                      seed=seed)


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def qwen3_5(request):
    return tiny_qwen3_5(moe=request.param)


@pytest.mark.parametrize("merge_layer", [4, 7], ids=["linear-attention", "full-attention"])
def test_qwen3_5_scores_are_the_last_token_attention_of_the_full_attention_layer_before(merge_layer):
    """Merging at a linear-attention layer (4) or at the next full-attention layer (7) ranks the visual tokens by
    the attention layer 3 pays them from the last token: its gated query, q/k norms and partial rotary."""
    model, processor = tiny_qwen3_5(backend="eager")
    inputs = encode(processor, [random_image(100, 150)])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions  # of the full-attention layers 3 and 7
    probabilities = attentions[0][0, :, -1].mean(0)
    with illava.applied(model, processor=processor, enable_illava_llm=True, illava_llm_k=str(merge_layer),
                        illava_llm_r=5, illava_llm_mode="drop"):
        model(**inputs)
        kept = illava.last_trace(model).language[0].kept_positions(0)
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    candidates = visual[:-1]  # the last visual token always survives
    dropped = set(visual.tolist()) - set(kept.tolist())
    assert dropped == set(candidates[probabilities[candidates].argsort()[:5]].tolist())


def test_qwen3_5_merge_layers_need_a_full_attention_layer_before_them(qwen3_5):
    model, processor = qwen3_5
    with pytest.raises(ValueError, match=r"illava_llm_k=2-5: layer\(s\) \[2\] have no full-attention layer before "
                                         r"them .*full-attention layers: \[3, 7\]"):
        illava.apply(model, processor=processor, enable_illava_llm=True, illava_llm_k="2-5")
    assert not illava.is_applied(model)
    with pytest.raises(ValueError, match=r"illava_llm_k=3: layer\(s\) \[3\]"):  # itself full attention, the first
        illava.apply(model, processor=processor, enable_illava_llm=True, illava_llm_k="3")
    assert not illava.is_applied(model)


def test_qwen3_5_token_counts_and_the_layers_after_a_merge_run_on_the_kept_tokens(qwen3_5):
    """Merges at the linear-attention layers 4 and 5 and at the full-attention layer 7, all scored by layer 3 (the
    nearest full-attention layer before each): every later layer, of either kind, runs on the shortened sequence."""
    model, processor = qwen3_5
    lengths = {}

    def remember(index):
        def hook(module, args, kwargs):
            lengths.setdefault(index, (args[0] if args else kwargs["hidden_states"]).shape[1])
        return hook

    with illava.applied(model, processor=processor, enable_illava_llm=True, illava_llm_k="4-5-7", illava_llm_r=0.5):
        handles = [layer.register_forward_pre_hook(remember(index), with_kwargs=True)  # after illava's
                   for index, layer in enumerate(model.model.language_model.layers)]
        try:
            inputs = encode(processor, [random_image(100, 150)])
            output = model(**inputs)
            trace = illava.last_trace(model).language
        finally:
            for handle in handles:
                handle.remove()
    length = inputs["input_ids"].shape[1]
    assert [layer.visual_tokens_per_span for layer in trace] == [[7], [3], [1]]  # of 15: 15-8, 7-4, 3-2
    assert [lengths[index] for index in range(8)] == [length] * 4 + [length - 8] + [length - 12] * 2 + [length - 14]
    assert output.logits.shape[1] == length and output.logits[0, -1].isfinite().all()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_qwen3_5_generate_batch_matches_alone_and_cache_matches_replay(backend, moe):
    """Merges at linear-attention layers (4, 5: the second ranks the survivors of the first by layer 3's scores)
    and at a full-attention layer (7), both stages, a left-padded batch whose rows keep different counts."""
    model, processor = tiny_qwen3_5(moe=moe, backend=backend, seed=4)
    options = dict(VIT, enable_illava_llm=True, illava_llm_k="4-5-7", illava_llm_r=0.7)
    with illava.applied(model, processor=processor, **options):
        tokens, logits = generate_batch(model, processor, BATCH_SAMPLES)
        trace = illava.last_trace(model).language
        assert len(trace) == 3 and bool((trace[0].positions < 0).any())  # padding slots in play
        assert_cache_matches_replay_and_batch_matches_alone(model, processor, tokens, logits)


def test_qwen3_5_several_new_tokens_on_a_merged_cache(qwen3_5):
    """A forward of several tokens on the cache a merged prefill returned (the linear-attention layers continue
    their recurrent state; the full-attention layers' mask columns are the kept tokens and the new ones) equals
    the merged forward of the whole sequence, whose prompt ends where the cached prompt did."""
    model, processor = qwen3_5
    inputs = encode(processor, [random_image(100, 150)])
    length = inputs["input_ids"].shape[1]
    sequence = torch.cat((inputs["input_ids"], torch.tensor([[65, 66, 67]])), dim=1)
    whole = dict(inputs, input_ids=sequence, attention_mask=torch.ones_like(sequence),
                 mm_token_type_ids=torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 3)))  # text follows
    seen, handle = capture_positions(model)
    try:
        with illava.applied(model, processor=processor, enable_illava_llm=True, illava_llm_k="4-7", illava_llm_r=0.5):
            with torch.no_grad():
                with illava.prompt_ends(model, length):
                    full = model(**whole).logits
                positions = seen["position_ids"][..., length:]  # the model derives them from the whole sequence
                prefill = model(**inputs, use_cache=True)
                assert illava.last_trace(model).language[-1].visual_tokens_per_span == [3]
                continued = model(input_ids=sequence[:, length:], attention_mask=torch.ones_like(sequence),
                                  position_ids=positions, use_cache=True,
                                  **{compat.CACHE_KEYWORD: compat.output_cache(prefill)}).logits
    finally:
        handle.remove()
    torch.testing.assert_close(continued, full[:, length:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [dict(num_beams=2, num_return_sequences=2), dict(num_return_sequences=2, do_sample=True)])
def test_qwen3_5_beams_and_repeated_rows_generate_as_without_cache(qwen3_5, options):
    """Beam search reorders the cache's rows (recurrent and conv states too) and the merge plan with them."""
    model, processor = qwen3_5
    inputs = processor(images=[random_image(100, 150), random_image(84, 84, seed=3)],
                       text=[IMAGE + "describe", "a longer text " + IMAGE + "it"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    unpatched = model.generate(**inputs, max_new_tokens=5, **options)
    torch.manual_seed(0)
    if not torch.equal(unpatched, model.generate(**inputs, max_new_tokens=5, use_cache=False, **options)):
        # transformers 5.20: the unpatched model's beam search with a cache already differs from without it
        pytest.skip(f"transformers {compat.installed_version()}: Qwen3.5 generates differently with a cache, "
                    f"unpatched, with {options}")
    with illava.applied(model, processor=processor, enable_illava_llm=True, illava_llm_k="4-7", illava_llm_r=0.6):
        torch.manual_seed(0)
        cached = model.generate(**inputs, max_new_tokens=5, **options)
        torch.manual_seed(0)
        assert torch.equal(cached, model.generate(**inputs, max_new_tokens=5, use_cache=False, **options))


@pytest.mark.parametrize("mode", ["drop", "shift", "pivot"])
def test_qwen3_5_modes_give_the_counts_of_the_default_merge_and_generate_as_replayed(qwen3_5, mode, tmp_path):
    model, processor = qwen3_5
    counts = {}
    for name in ("merge", mode):
        with illava.applied(model, processor=processor, **VIT, enable_illava_llm=True, illava_llm_k="4-7",
                            illava_llm_r=0.5, illava_llm_mode=name, illava_pc_ratio=0.3,
                            illava_track_vit_source=True, illava_track_llm_source=True):
            inputs = sample_inputs(processor)
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            trace = illava.last_trace(model)
            counts[name] = [layer.visual_tokens_per_span for layer in trace.language]
            assert any(path.name.startswith("attention_map_llm_layer_")
                       for path in write_heatmaps(model, processor, inputs, trace, tmp_path / name))
            assert torch.equal(tokens, model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False))
    assert counts[mode] == counts["merge"] == [[4, 6], [2, 3]]  # of 9 image and 12 video tokens


def test_llm_stage_counts_a_video_as_one_span_across_its_timestamps(qwen3):
    """A video's frame runs are one span; only its very last token is protected, in every mode the same count."""
    model, processor = qwen3
    counts = {}
    for mode in ("merge", "shift"):
        with illava.applied(model, processor=processor, enable_illava_llm=True, illava_llm_k="4", illava_llm_r=0.5,
                            illava_llm_mode=mode):
            inputs = encode(processor, videos=[random_video(6, 84, 112)])  # 3 frame pairs of 12 tokens
            model(**inputs)
            layer = illava.last_trace(model).language[0]
            counts[mode] = layer.visual_tokens_per_span
            kept = layer.kept_positions(0)
        video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
        assert int(video[-1]) in kept.tolist()
    assert counts == {"merge": [18], "shift": [18]}


def test_placed_features_from_the_output_or_a_clear_error(qwen3):
    model, processor = qwen3
    with illava.applied(model, processor=processor, **VIT):
        inputs = encode(processor, [random_image(100, 150)])
        output = model(**inputs)
        if not hasattr(output, "image_outputs"):  # transformers < 5.24
            with pytest.raises(ValueError, match="does not carry the image features"):
                compat.image_features(output)
        else:
            assert compat.image_features(output).shape == (9, model.config.text_config.hidden_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with flash-attn")
def test_flash_attention_2_matches_sdpa_on_gpu():
    """Both stages: the vision blocks' re-sliced `cu_seqlens` / `max_seqlen`, and the decoder's padding masks."""
    pytest.importorskip("flash_attn")
    results = {}
    for backend in ("sdpa", "flash_attention_2"):
        model, processor = tiny_qwen3(attn_implementation=backend, seed=5)
        model = model.to("cuda", torch.bfloat16)
        with illava.applied(model, processor=processor, **VIT, enable_illava_llm=True, illava_llm_k="1-4",
                            illava_llm_r=0.6):
            inputs = processor(images=[random_image(100, 150), random_image(84, 84, seed=3)],
                               text=[IMAGE + "describe", IMAGE + "what is it"], padding=True, return_tensors="pt")
            inputs = inputs.to("cuda")
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            results[backend] = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(results["sdpa"], results["flash_attention_2"])


def test_the_vision_tower_as_a_tuple_is_refused_while_merging(qwen3):
    """A tuple output cannot carry the DeepStack features that follow the merges: an error, not misaligned rows."""
    model, processor = qwen3
    pixels = processor.image_processor([random_image(100, 150)], return_tensors="pt")
    with illava.applied(model, processor=processor, **VIT):
        with pytest.raises(ValueError, match="return_dict=True"):
            model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"], return_dict=False)
        output = model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
    assert [level.shape[0] for level in output.deepstack_features] == [15, 15, 15]  # full window count, zeros merged
