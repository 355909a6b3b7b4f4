"""LLM-stage merging (Qwen2 decoder layers of LLaVA-OneVision)."""

import pytest
import torch

import illava
from illava import merge
from illava.compat import CACHE_KEYWORD, output_cache
from illava.patches.decoder import LanguageModelMerger
from illava.tools.tiny_models import tiny_llava_onevision

from .conftest import logits_of, random_image, random_video, tiny_ov

LLM = dict(enable_illava_llm=True)


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def ov(request):
    return tiny_ov(image_size=56, vision_layers=4, text_layers=6, attn_implementation=request.param, seed=7)


def prompt(processor, image, text="describe it"):
    return processor(images=[[image]], text="<image>" + text, return_tensors="pt")


def mixed_batch(processor):
    """Different image sizes, two images in one sample, a video, and different prompt lengths."""
    samples = [
        dict(images=[random_image(40, 90, seed=1)], text="<image>describe it"),
        dict(images=[random_image(56, 56, seed=2)], text="<image>what is this thing here, tell me"),
        dict(images=[random_image(30, 50, seed=3), random_image(90, 40, seed=4)], text="<image><image>compare"),
        dict(videos=[random_video(3, seed=5)], text="<video>what happens"),
    ]
    return samples


def encode(processor, samples):
    images = [sample["images"] for sample in samples if "images" in sample]
    videos = [video for sample in samples for video in sample.get("videos", [])]
    return processor(
        images=images or None,
        videos=videos or None,
        text=[sample["text"] for sample in samples],
        padding=True,
        return_tensors="pt",
    )


def greedy(model, inputs, steps=5):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


class ScoreReplay:
    """Records the LLM-stage scores of one prefill and replays them in a later forward on a longer sequence, so
    a cache-free recomputation merges exactly the same tokens into exactly the same values."""

    def __init__(self, monkeypatch):
        self.recorded, self.replaying, self.cursor = [], False, 0
        original = LanguageModelMerger._scores

        def scores(merger, run, layer_index):
            fresh = original(merger, run, layer_index)
            if not self.replaying:
                self.recorded.append(fresh)
                return fresh
            recorded = self.recorded[self.cursor]
            self.cursor += 1
            replay = torch.zeros_like(fresh)
            replay[:, : recorded.shape[1]] = recorded  # the prompt's slots come first; extra tokens follow
            return replay

        monkeypatch.setattr(LanguageModelMerger, "_scores", scores)

    def start(self):
        self.replaying, self.cursor = True, 0


def generate_position_ids(attention_mask):
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


# -- equality with the unpatched model ----------------------------------------------------------------------


def test_keep_all_and_text_only_equal_unpatched_with_either_attention(ov):
    """(Off, r=0 and remove on every family, with sdpa: `test_contract.py`.)"""
    model, processor = ov
    inputs = prompt(processor, random_image(40, 90))
    text_only = processor(text="just some words", return_tensors="pt")
    baseline, text_baseline = logits_of(model, inputs), logits_of(model, text_only)
    with illava.applied(model, illava_llm_k="2-3", illava_llm_r=0, processor=processor, **LLM):
        assert torch.equal(logits_of(model, inputs), baseline)
    with illava.applied(model, illava_llm_k="2", illava_llm_r=0.5, processor=processor, **LLM):
        assert not torch.equal(logits_of(model, inputs), baseline)
        assert torch.equal(logits_of(model, text_only), text_baseline)


def test_token_counts_and_output_alignment(ov):
    model, processor = ov
    inputs = prompt(processor, random_image(40, 90))
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with illava.applied(model, illava_llm_k="2-4", illava_llm_r=0.5, processor=processor, **LLM):
        logits = logits_of(model, inputs)
        first, second = illava.last_trace(model).language
    assert logits.shape[:2] == inputs["input_ids"].shape  # scattered back: logits line up with the input
    assert first.layer == 2 and first.visual_tokens_per_span == [visual // 2]
    assert second.layer == 4 and second.visual_tokens_per_span == [visual // 2 // 2]
    text = inputs["input_ids"].shape[1] - visual
    assert first.positions.shape[1] == text + visual // 2
    # text positions all survive, visual survivors are a subset, everything stays in order
    kept = second.kept_positions(0)
    assert torch.all(kept[1:] > kept[:-1])
    is_visual = inputs["input_ids"][0] == model.config.image_token_id
    assert torch.equal(kept[~is_visual[kept]], (~is_visual).nonzero().squeeze(1))


def test_merge_decisions_match_eager_attention_probabilities(ov):
    model, processor = ov
    inputs = prompt(processor, random_image(40, 90))
    layer = 3
    reference_model, _ = tiny_llava_onevision(
        image_size=56, vision_layers=4, text_layers=6, attn_implementation="eager", seed=7
    )
    with torch.no_grad():
        attentions = reference_model(**inputs, output_attentions=True).attentions
    scores = attentions[layer - 1][:, :, -1, :].float().mean(dim=1)  # last token, mean over heads
    is_visual = inputs["input_ids"] == model.config.image_token_id
    candidates = is_visual[0].nonzero().squeeze(1)
    candidate_scores = scores[:, candidates].clone()
    candidate_scores[:, -1] = torch.finfo(candidate_scores.dtype).max  # the span's last token always survives
    plan = merge.plan_merge(candidate_scores, r=len(candidates) - int(0.6 * len(candidates)))
    expected_dropped = set(candidates[~plan.keep[0]].tolist())
    with illava.applied(model, illava_llm_k=str(layer), illava_llm_r=0.6, processor=processor, **LLM):
        logits_of(model, inputs)
        kept = set(illava.last_trace(model).language[0].kept_positions(0).tolist())
    assert kept == set(range(inputs["input_ids"].shape[1])) - expected_dropped


def test_cached_generation_equals_cache_free_replay(ov, monkeypatch):
    """Every decode step's logits equal a full recomputation without cache that merges the same tokens into the
    same values: any off-by-one in the decode mask columns, positions or cache slices breaks this."""
    model, processor = ov
    replay = ScoreReplay(monkeypatch)
    batch = encode(processor, mixed_batch(processor)[:3])
    with illava.applied(model, illava_llm_k="2-4", illava_llm_r=0.6, processor=processor, **LLM):
        tokens, step_logits = greedy(model, batch, steps=5)
        layouts = illava.last_trace(model).language
        assert bool((layouts[0].positions < 0).any())  # samples kept different counts: padding slots in play
        replay.start()
        sequence = torch.cat((batch["input_ids"], tokens), dim=1)
        attention_mask = torch.cat((batch["attention_mask"], torch.ones_like(tokens)), dim=1)
        full = dict(batch, input_ids=sequence, attention_mask=attention_mask)
        with torch.no_grad():
            logits = model(**full, position_ids=generate_position_ids(attention_mask), use_cache=False).logits
    prompt_length = batch["input_ids"].shape[1]
    recomputed = logits[:, prompt_length - 1 : -1]
    torch.testing.assert_close(recomputed, step_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(recomputed.argmax(-1), tokens)


def test_generate_without_cache_gives_the_cached_answer(ov):
    """generate(use_cache=False) re-runs the whole sequence every step; it must merge as the cached prefill did
    (scored by the last prompt token), not re-score by the newest generated token."""
    model, processor = ov
    batch = encode(processor, mixed_batch(processor)[:3])
    with illava.applied(model, illava_llm_k="2-4", illava_llm_r=0.6, processor=processor, **LLM):
        cached_tokens, cached_logits = greedy(model, batch, steps=6)
        cached_layouts = illava.last_trace(model).language
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, use_cache=False)
        free_layouts = illava.last_trace(model).language
    prompt_length = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, prompt_length:], cached_tokens)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), cached_logits, rtol=1e-4, atol=1e-4)
    # the last cache-free step kept the same prompt positions, plus every generated token
    for cached, free in zip(cached_layouts, free_layouts):
        for row in range(batch["input_ids"].shape[0]):
            kept = free.kept_positions(row)
            assert torch.equal(kept[kept < prompt_length], cached.kept_positions(row))
            assert bool((kept >= prompt_length).sum() == out.sequences.shape[1] - 1 - prompt_length)


def test_prompt_ends_scores_a_continuation_with_the_merge_of_its_prompt(ov):
    """A loglikelihood appends a continuation to the prompt: inside `illava.prompt_ends` the merge (and so every
    prompt position's output) is the one the prompt alone gets, whatever the continuation."""
    model, processor = ov
    with illava.applied(model, illava_llm_k="2-4", illava_llm_r=0.5, processor=processor, **LLM):
        alone = prompt(processor, random_image(40, 90), text="what colour")
        length = alone["input_ids"].shape[1]
        alone_logits = logits_of(model, alone)
        alone_kept = illava.last_trace(model).language[-1].kept_positions(0)
        for continuation in (" red", " a long blue answer"):
            inputs = prompt(processor, random_image(40, 90), text="what colour" + continuation)
            with illava.prompt_ends(model, length):
                logits = logits_of(model, inputs)
            kept = illava.last_trace(model).language[-1].kept_positions(0)
            assert torch.equal(kept[kept < length], alone_kept)
            visible = alone_logits[0].isfinite().all(-1)
            torch.testing.assert_close(logits[0, :length][visible], alone_logits[0][visible], rtol=1e-4, atol=1e-4)


def test_continuing_from_returned_cache(ov, monkeypatch):
    model, processor = ov
    replay = ScoreReplay(monkeypatch)
    inputs = prompt(processor, random_image(40, 90))
    with illava.applied(model, illava_llm_k="2-4", illava_llm_r=0.5, processor=processor, **LLM):
        at_once = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        resumed = model.generate(
            input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences),
            max_new_tokens=3, do_sample=False, **{CACHE_KEYWORD: output_cache(first)},
        )
        assert torch.equal(resumed, at_once)

        # several new tokens at once on top of the merged cache: the last generated token plus two more
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        sequence = torch.cat((first.sequences, torch.tensor([[65, 66]])), dim=1)
        with torch.no_grad():
            continued = model(
                input_ids=sequence[:, -3:], use_cache=True, **{CACHE_KEYWORD: output_cache(first)},
                attention_mask=torch.ones_like(sequence),
            ).logits
        replay.recorded = replay.recorded[-2:]  # the scores of the last prefill
        replay.start()
        with torch.no_grad():
            full = model(**dict(inputs, input_ids=sequence, attention_mask=torch.ones_like(sequence))).logits
    torch.testing.assert_close(continued, full[:, -3:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [2, 4])
def test_batch_gives_the_same_greedy_tokens_as_samples_alone(ov, size):
    model, processor = ov
    samples = mixed_batch(processor)[:size]
    with illava.applied(
        model, illava_vit_k="1", illava_vit_r=3, illava_llm_k="2-3", illava_llm_r=0.7, processor=processor,
        enable_illava_vit=True, **LLM,
    ):
        batched_tokens, batched_logits = greedy(model, encode(processor, samples))
        for index, sample in enumerate(samples):
            tokens, logits = greedy(model, encode(processor, [sample]))
            assert torch.equal(batched_tokens[index], tokens[0])
            torch.testing.assert_close(batched_logits[index], logits[0], rtol=1e-4, atol=1e-4)


def test_sources_map_every_visual_token_to_a_survivor(ov):
    model, processor = ov
    inputs = prompt(processor, random_image(40, 90))
    with illava.applied(
        model, illava_llm_k="2-4", illava_llm_r=0.5, illava_track_llm_source=True, processor=processor, **LLM
    ):
        logits_of(model, inputs)
        last = illava.last_trace(model).language[-1]
    sources = last.sources[0]
    kept = set(last.kept_positions(0).tolist())
    assert set(sources.tolist()) == kept  # every position is represented by a survivor
    assert all(sources[position].item() == position for position in kept)
    is_visual = inputs["input_ids"][0] == model.config.image_token_id
    assert bool(is_visual[sources[is_visual]].all())  # visual tokens merge only into visual tokens


def test_errors(ov):
    model, processor = ov
    with pytest.raises(ValueError, match="layer 0"):
        illava.apply(model, illava_llm_k="0", **LLM)
    inputs = prompt(processor, random_image(40, 90))
    with illava.applied(model, illava_llm_k="2", processor=processor, **LLM):
        first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="empty KV cache"):
            model(**inputs, **{CACHE_KEYWORD: output_cache(first)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with flash-attn")
def test_flash_attention_2_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn")
    results = {}
    for backend in ("sdpa", "flash_attention_2"):
        model, processor = tiny_ov(image_size=56, vision_layers=4, text_layers=6, seed=7)
        model = model.to("cuda", torch.bfloat16)
        model.set_attn_implementation(backend)
        batch = encode(processor, mixed_batch(processor)[:3]).to("cuda")
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        batch["pixel_values_videos"] = batch.get("pixel_values_videos")
        with illava.applied(model, illava_llm_k="2-4", illava_llm_r=0.6, processor=processor, **LLM):
            results[backend] = greedy(model, {k: v for k, v in batch.items() if v is not None})
    assert torch.equal(results["sdpa"][0], results["flash_attention_2"][0])


def test_llm_sources_map_back_through_the_vit_stage(ov):
    model, processor = ov
    with illava.applied(
        model, enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=3, illava_track_vit_source=True,
        illava_llm_k="2-4", illava_llm_r=0.5, illava_track_llm_source=True, processor=processor, **LLM,
    ):
        batch = encode(processor, mixed_batch(processor))
        ids = batch["input_ids"]
        is_visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
        logits_of(model, batch)
        trace = illava.last_trace(model)
        last = trace.language[-1]
        for entry_index, entry in enumerate(trace.vision):
            groups_sample, positions = trace.llm_source_map(entry_index)
            assert positions.shape == (entry.num_groups, 4, 4)
            for group in range(entry.num_groups):
                sample = int(groups_sample[group])
                mapped = positions[group][positions[group] >= 0]
                kept = set(last.kept_positions(sample).tolist())
                assert set(mapped.tolist()) <= kept  # mapped onto survivors of the last LLM merge...
                assert bool(is_visual[sample, mapped].all())  # ...that are visual tokens of that sample
    # which samples own the groups: image groups of samples 0, 1, 2, 2 and the video's frames of sample 3
    image_entry = trace.by_modality("image")[0]
    assert trace.llm_source_map(trace.vision.index(image_entry))[0].unique().tolist() == [0, 1, 2]


def test_llm_source_map_without_merging_is_the_plain_layout(ov):
    model, processor = ov
    inputs = prompt(processor, random_image(56, 56))
    with illava.applied(
        model, illava_llm_k="2", illava_llm_r=0, illava_track_llm_source=True, processor=processor, **LLM
    ):
        logits_of(model, inputs)
        samples, positions = illava.last_trace(model).llm_source_map(0)
    first = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    # the base crop's patches are the first 16 placeholders, in raster order
    assert torch.equal(positions[0].flatten(), first + torch.arange(16))
    assert samples.tolist() == [0] * positions.shape[0]


def test_slice_mask_formats_for_a_shortened_batch():
    from illava.patches.decoder import slice_mask

    # sample 0 kept original positions 0, 2, 3; sample 1 kept 1, 3 and got one padding slot on the left
    index = torch.tensor([[0, 2, 3], [0, 1, 3]])
    valid = torch.tensor([[True, True, True], [False, True, True]])
    padding_2d = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # sample 1 was left-padded originally too
    args = dict(rows=index, row_original=index, row_is_padding=~valid, columns=index, column_valid=valid,
                dtype=torch.float32)
    flash = slice_mask(padding_2d, implementation="flash_attention_2", **args)
    assert flash.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert slice_mask(None, implementation="flash_attention_2", **args).tolist() == [[1, 1, 1], [0, 1, 1]]
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    full = (causal[None] & padding_2d.bool()[:, None, :])[:, None]  # sdpa-style [B, 1, Q, K]
    sdpa = slice_mask(full, implementation="sdpa", **args)
    assert sdpa[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # the padding slot attends only to itself; nobody attends to it
    assert sdpa[1, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    eager = slice_mask(torch.where(full, 0.0, torch.finfo(torch.float32).min), implementation="eager", **args)
    assert torch.equal(eager == 0, sdpa)
    assert torch.equal(slice_mask(None, implementation="sdpa", **args)[0], sdpa[0])
    no_padding = dict(args, column_valid=torch.ones_like(valid), row_is_padding=torch.zeros_like(valid))
    assert slice_mask(None, implementation="sdpa", **no_padding) is None
