"""Qwen2-VL: packed ViT-stage merging in 2x2 windows, M-RoPE positions of survivors, LLM stage with M-RoPE.
(Off, r=0, remove, copies and bad settings on every family: `test_contract.py`.)"""

import pytest
import torch

import illava

from .conftest import QWEN_IMAGE as IMAGE
from .conftest import QWEN_VIDEO as VIDEO
from .conftest import QWEN_VIT as VIT
from .conftest import capture_positions, random_image, random_video, tiny_qwen2


@pytest.fixture(scope="module", params=["Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"])
def qwen(request):
    """Qwen2-VL, and Qwen2.5-VL with 2x2-window attention in all blocks but 2 and 5."""
    return tiny_qwen2(model_class=request.param)


def encode(processor, images=(), videos=(), text="describe"):
    prompt = IMAGE * len(images) + VIDEO * len(videos) + text
    return processor(images=list(images) or None, videos=list(videos) or None, text=prompt, return_tensors="pt")


def test_window_counts_per_segment_and_llm_token_count(qwen):
    model, processor = qwen
    with illava.applied(model, processor=processor, **VIT):
        inputs = encode(processor, [random_image(100, 150)], [random_video(4, 84, 112)])
        output = model(**inputs)
        image, video = illava.last_trace(model).vision
    # image: 8x10 patches = 4x5 windows = 20; video: 2 temporal slices of 3x4 windows = 12 each
    assert (image.modality, image.grid, image.tokens_per_group) == ("image", (4, 5), [20, 17, 14])
    assert (video.modality, video.grid, video.groups_per_item) == ("video", (3, 4), [2])
    assert video.tokens_per_group == [12, 9, 6] and video.positions.shape == (2, 6)  # every slice kept
    ids = inputs["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == 14
    assert int((ids == model.config.video_token_id).sum()) == 12
    assert output.logits.shape[1] == ids.shape[1]


def test_fraction_r_is_a_fraction_of_windows(qwen):
    model, processor = qwen
    with illava.applied(model, processor=processor, enable_illava_vit=True, illava_vit_k="2-3-4", illava_vit_r=0.16):
        model(**encode(processor, [random_image(100, 150)]))
        assert illava.last_trace(model).vision[0].tokens_per_group == [20, 17, 15, 13]


def test_segments_never_mix(qwen):
    model, processor = qwen
    first_image = random_image(100, 150, seed=1)
    with illava.applied(model, processor=processor, illava_track_vit_source=True, **VIT):
        a = model.model.get_image_features(**{k: v for k, v in processor.image_processor(
            [first_image, random_image(84, 84, seed=2)], return_tensors="pt").items()}).pooler_output
        entries_a = illava.last_trace(model).vision
        b = model.model.get_image_features(**{k: v for k, v in processor.image_processor(
            [first_image, random_image(84, 84, seed=9)], return_tensors="pt").items()}).pooler_output
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert not torch.allclose(a[1], b[1])
    for entry in entries_a:
        windows = entry.grid[0] * entry.grid[1]
        assert bool(((entry.positions >= 0) & (entry.positions < windows)).all())  # survivors from their own image
        assert int(entry.sources.max()) == entry.tokens_per_group[-1] - 1


def test_survivors_keep_their_true_mrope_positions(qwen):
    model, processor = qwen
    image, video = random_image(100, 150), random_video(4, 84, 112)
    full_inputs = encode(processor, [image], [video])
    full_positions, full_deltas = model.model.get_rope_index(
        full_inputs["input_ids"], full_inputs["mm_token_type_ids"], full_inputs["image_grid_thw"],
        full_inputs["video_grid_thw"], attention_mask=full_inputs["attention_mask"],
    )
    with illava.applied(model, processor=processor, **VIT):
        inputs = encode(processor, [image], [video])
        for run in ("forward", "generate"):
            seen, handle = capture_positions(model)
            try:
                if run == "forward":
                    model(**inputs)
                else:
                    model.generate(**inputs, max_new_tokens=2, do_sample=False)
            finally:
                handle.remove()
            positions = seen["position_ids"][-3:]
            image_entry, video_entry = illava.last_trace(model).vision
            # expected: the unmerged positions at the surviving windows, text positions unchanged
            ids, full_ids = inputs["input_ids"][0], full_inputs["input_ids"][0]
            expected = []
            for token_id, entry in ((model.config.image_token_id, image_entry), (model.config.video_token_id, video_entry)):
                start = int((full_ids == token_id).nonzero()[0])
                windows = entry.grid[0] * entry.grid[1]
                kept = (torch.arange(entry.positions.shape[0])[:, None] * windows + entry.positions).flatten()
                expected.append(full_positions[:, 0, start + kept])
                assert torch.equal(positions[:, 0, ids == token_id], expected[-1]), run
            text = ~((ids == model.config.image_token_id) | (ids == model.config.video_token_id))
            full_text = ~((full_ids == model.config.image_token_id) | (full_ids == model.config.video_token_id))
            assert torch.equal(positions[:, 0, text], full_positions[:, 0, full_text]), run
        # the next text position is the same as without merging: max + 1 over a shorter prompt
        assert torch.equal(model.model.rope_deltas, full_deltas + (full_ids.numel() - ids.numel()))


@pytest.mark.parametrize("options", [dict(num_beams=2, num_return_sequences=2), dict(num_return_sequences=2, do_sample=True)])
def test_generate_that_repeats_rows_gives_each_row_the_prompts_positions(qwen, options):
    model, processor = qwen
    with illava.applied(model, processor=processor, **VIT):
        inputs = encode(processor, [random_image(100, 150)], [random_video(4, 84, 112)])
        seen, handle = capture_positions(model)
        try:
            model(**inputs)
            alone = seen["position_ids"][-3:]
            torch.manual_seed(0)
            output = model.generate(**inputs, max_new_tokens=2, **options)
        finally:
            handle.remove()
    assert output.shape[0] == 2
    repeated = seen["position_ids"][-3:]
    assert repeated.shape[1] == 2 and torch.equal(repeated, alone.expand(-1, 2, -1))


@pytest.mark.parametrize(
    "backend, model_class",
    [("eager", "Qwen2VLForConditionalGeneration"), ("sdpa", "Qwen2VLForConditionalGeneration"),
     ("sdpa", "Qwen2_5_VLForConditionalGeneration")],
)
def test_generate_both_stages_and_batch_matches_alone(backend, model_class):
    model, processor = tiny_qwen2(attn_implementation=backend, seed=4, model_class=model_class)
    samples = [
        dict(images=[random_image(100, 150, seed=1)], text=IMAGE + "describe"),
        dict(videos=[random_video(4, 84, 112, seed=2)], text=VIDEO + "what happens here"),
        dict(images=[random_image(84, 84, seed=3)], videos=[random_video(2, 84, 112, seed=4)],
             text=IMAGE + VIDEO + "both"),
    ]
    options = dict(VIT, enable_illava_llm=True, illava_llm_k="2-3", illava_llm_r=0.9)

    def run(batch_samples):
        images = [image for sample in batch_samples for image in sample.get("images", [])]
        videos = [video for sample in batch_samples for video in sample.get("videos", [])]
        inputs = processor(images=images or None, videos=videos or None, text=[s["text"] for s in batch_samples],
                           padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)

    with illava.applied(model, processor=processor, **options):
        tokens, logits = run(samples)
        assert len(illava.last_trace(model).language) == 2
        for index, sample in enumerate(samples):
            alone_tokens, alone_logits = run([sample])
            assert torch.equal(tokens[index], alone_tokens[0])
            torch.testing.assert_close(logits[index], alone_logits[0], rtol=1e-4, atol=1e-4)


def test_too_large_r_names_the_value_and_the_grid(qwen):
    model, processor = qwen
    with illava.applied(model, processor=processor, enable_illava_vit=True, illava_vit_k="2", illava_vit_r=12):
        with pytest.raises(ValueError, match="illava_vit_r=12 leaves no token in an image/frame of 3x4"):
            model(**encode(processor, [random_image(84, 112)]))


def test_qwen25_window_boundaries_follow_the_survivors():
    """After merging, windowed blocks attend within the survivors' own windows, full blocks within images."""
    model, processor = tiny_qwen2(model_class="Qwen2_5_VLForConditionalGeneration")
    visual = model.model.visual
    seen = {}

    def capture(index):
        def hook(module, args, kwargs):
            seen.setdefault(index, []).append(kwargs["cu_seqlens"].tolist())
        return hook

    with illava.applied(model, processor=processor, enable_illava_vit=True, illava_vit_k="0-1", illava_vit_r=3):
        # registered after illava's own hooks, so they see what the blocks receive
        handles = [visual.blocks[index].register_forward_pre_hook(capture(index), with_kwargs=True) for index in (3, 5)]
        try:
            model(**encode(processor, [random_image(100, 150)], [random_video(4, 84, 112)]))
        finally:
            for handle in handles:
                handle.remove()
        entries = illava.last_trace(model).vision
    window_side = visual.window_size // visual.spatial_merge_size // visual.patch_size  # in 2x2 units
    for call, entry in enumerate(entries):  # images and videos go through the encoder in separate calls
        expected_windows, expected_images, total = [0], [0], 0
        rows, cols = entry.grid
        windows_per_row = -(-cols // window_side)
        for slice_positions in entry.positions:
            window = (slice_positions // cols // window_side) * windows_per_row + slice_positions % cols // window_side
            _, counts = torch.unique(window, return_counts=True)  # the encoder orders windows row-major
            for count in counts.tolist():
                total += count * 4
                expected_windows.append(total)
            expected_images.append(total)
        assert seen[3][call] == expected_windows  # block 3 is windowed
        assert seen[5][call] == expected_images  # block 5 attends over whole images / frames


def test_llm_sources_map_windows_to_surviving_llm_tokens(qwen):
    model, processor = qwen
    with illava.applied(model, processor=processor, illava_track_vit_source=True, enable_illava_llm=True,
                        illava_llm_k="2", illava_llm_r=0.5, illava_track_llm_source=True, **VIT):
        inputs = encode(processor, [random_image(100, 150)], [random_video(4, 84, 112)])
        model(**inputs)
        trace = illava.last_trace(model)
        kept = set(trace.language[-1].kept_positions(0).tolist())
        ids = inputs["input_ids"][0]
        for index, entry in enumerate(trace.vision):
            samples, positions = trace.llm_source_map(index)
            assert positions.shape == (entry.num_groups, *entry.grid) and samples.tolist() == [0] * entry.num_groups
            mapped = set(positions.flatten().tolist())
            token = model.config.image_token_id if entry.modality == "image" else model.config.video_token_id
            assert -1 not in mapped and mapped <= kept
            assert all(int(ids[position]) == token for position in mapped)
