import math

import pytest
import torch

import illava
from illava.compat import image_features, video_features
from illava.tools.tiny_models import tiny_llava_onevision

from .conftest import logits_of, random_image, random_video

VIT = dict(enable_illava_vit=True)


def image_prompt(processor, images, text="describe"):
    images = images if isinstance(images, list) else [images]
    return processor(images=[images], text="<image>" * len(images) + text, return_tensors="pt")


def count(inputs, token_id):
    return int((inputs["input_ids"] == token_id).sum())


# -- a second model (off, r=0, remove, copies, bad settings: test_contract.py) -------------------------------


def test_a_second_model_in_the_process_is_unaffected():
    patched, processor = tiny_llava_onevision(image_size=56, vision_layers=6, seed=3)
    untouched, untouched_processor = tiny_llava_onevision(image_size=56, vision_layers=6, seed=3)
    inputs = image_prompt(untouched_processor, random_image(56, 56))
    baseline = logits_of(untouched, inputs)
    illava.apply(patched, illava_vit_k="1-2", illava_vit_r=4, processor=processor, **VIT)
    merged_inputs = image_prompt(processor, random_image(56, 56))
    assert merged_inputs["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    logits_of(patched, merged_inputs)
    # the second model and a second processor of the same kind still behave as before
    assert torch.equal(logits_of(untouched, image_prompt(untouched_processor, random_image(56, 56))), baseline)
    assert not illava.is_applied(untouched)


# -- seed token counts on the real SigLIP geometry --------------------------------------------------------


@pytest.mark.parametrize(
    "k, r, per_crop, side", [("5-6-7-8", 92, 361, 19), ("2-3-4-5-6-7-8", 80, 169, 13)]
)
def test_seed_image_token_counts(siglip384_ov, k, r, per_crop, side):
    model, processor = siglip384_ov
    with illava.applied(model, illava_vit_k=k, illava_vit_r=r, processor=processor, **VIT):
        for height, width in [(384, 384), (300, 700), (700, 300), (500, 520)]:
            inputs = image_prompt(processor, random_image(height, width))
            output = model(**inputs)
            entry = illava.last_trace(model).vision[0]
            assert entry.modality == "image"
            assert entry.tokens_per_group[0] == 729 and entry.tokens_per_group[-1] == per_crop
            assert entry.positions.shape == (entry.num_groups, per_crop)
            # the LLM saw exactly as many image features as there are placeholders
            assert image_features(output).shape[0] == count(inputs, model.config.image_token_id)
            if (height, width) == (384, 384):  # one 384 crop + base: pseudo grid side x side, side newlines + 1
                assert count(inputs, model.config.image_token_id) == per_crop + side * side + side


def test_seed_video_token_count_is_100_per_frame(siglip384_ov):
    model, processor = siglip384_ov
    with illava.applied(model, illava_vit_k="3-4-5-6", illava_vit_r=92, processor=processor, **VIT):
        inputs = processor(videos=random_video(4), text="<video>what happens", return_tensors="pt")
        assert count(inputs, model.config.video_token_id) == 4 * 100 + 1
        output = model(**inputs)
        entry = illava.last_trace(model).vision[0]
        assert entry.modality == "video" and entry.tokens_per_group[-1] == 361 and entry.groups_per_item == [4]
        assert video_features(output).shape[0] == 401


@pytest.mark.parametrize("r", [90, 0.1])
def test_non_square_counts_match_placeholders(siglip384_ov, r):
    model, processor = siglip384_ov
    with illava.applied(model, illava_vit_k="5-6-7-8", illava_vit_r=r, processor=processor, **VIT):
        per_crop = illava.IllavaConfig(illava_vit_k="5-6-7-8", illava_vit_r=r).vit_token_counts(729)[-1]
        assert math.isqrt(per_crop) ** 2 != per_crop
        for height, width in [(300, 700), (384, 384)]:
            inputs = image_prompt(processor, random_image(height, width))
            output = model(**inputs)
            crops = illava.last_trace(model).vision[0].num_groups
            assert count(inputs, model.config.image_token_id) == crops * per_crop + 1
            assert image_features(output).shape[0] == crops * per_crop + 1
        inputs = processor(videos=random_video(3), text="<video>what", return_tensors="pt")
        assert count(inputs, model.config.video_token_id) == 3 * math.ceil(per_crop / 4) + 1
        model(**inputs)


def test_stitched_layout_orders_survivors_by_original_position(siglip384_ov):
    model, processor = siglip384_ov
    with illava.applied(model, illava_vit_k="5-6-7-8", illava_vit_r=90, processor=processor, **VIT):
        inputs = image_prompt(processor, random_image(300, 700))  # a wide image: base crop + a 1 x 2 crop grid
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        entry = illava.last_trace(model).vision[0]
        merged_crops = model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states[-1]
    assert entry.num_groups == 3
    per_crop = entry.tokens_per_group[-1]
    projected = model.model.multi_modal_projector(merged_crops)
    torch.testing.assert_close(features[:per_crop], projected[0])  # base crop first, in raster order
    assert torch.equal(features[-1], model.model.image_newline)  # one newline at the end
    rows, cols = entry.grid
    coordinates = []
    for crop in (1, 2):
        for position in entry.positions[crop].tolist():
            coordinates.append((position // cols, (crop - 1) * cols + position % cols))
    expected_order = sorted(range(len(coordinates)), key=lambda index: coordinates[index])
    torch.testing.assert_close(features[per_crop:-1], projected[1:].flatten(0, 1)[expected_order])


# -- independence, backends, sources ----------------------------------------------------------------------


def test_changing_one_image_leaves_the_other_images_features_unchanged(siglip384_ov):
    model, processor = siglip384_ov
    with illava.applied(model, illava_vit_k="5-6-7-8", illava_vit_r=92, processor=processor, **VIT):
        first = image_prompt(processor, [random_image(384, 384, seed=1), random_image(384, 384, seed=2)])
        second = image_prompt(processor, [random_image(384, 384, seed=1), random_image(384, 384, seed=9)])
        a = image_features(model(**first))
        b = image_features(model(**second))
        assert illava.last_trace(model).vision[0].groups_per_item == [1, 1]
    per_image = 361 + 1  # several images in one prompt: base crop only, then a newline
    assert a.shape[0] == 2 * per_image
    torch.testing.assert_close(a[:per_image], b[:per_image], rtol=0, atol=1e-6)
    assert not torch.allclose(a[per_image:], b[per_image:])


def test_eager_and_sdpa_make_the_same_merge_decisions():
    image = random_image(384, 384, seed=5)
    decisions, logits = {}, {}
    for backend in ("eager", "sdpa"):
        model, processor = tiny_llava_onevision(
            image_size=384, vision_layers=9, text_layers=2, attn_implementation=backend
        )
        with illava.applied(model, illava_vit_k="5-6-7-8", illava_vit_r=92, processor=processor, **VIT):
            logits[backend] = logits_of(model, image_prompt(processor, image))
            decisions[backend] = illava.last_trace(model).vision[0].positions
    assert torch.equal(decisions["eager"], decisions["sdpa"])
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-4)


def test_merge_scores_match_eager_attention_probabilities(siglip384_ov):
    """The chunked score equals the mean attention received computed from eager attention weights."""
    from illava import merge

    model, processor = siglip384_ov
    pixel_values = image_prompt(processor, random_image(384, 384))["pixel_values"][0, :1]
    tower = model.model.vision_tower
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation(previous)
    layer = tower.encoder.layers[5]
    normed = layer.layer_norm1(out.hidden_states[5])
    attention = layer.self_attn
    shape = (1, 729, -1, attention.head_dim)
    query = attention.q_proj(normed).view(shape).transpose(1, 2)
    key = attention.k_proj(normed).view(shape).transpose(1, 2)
    received = merge.attention_received(query, key, attention.scale)
    torch.testing.assert_close(received, out.attentions[5].mean(dim=(1, 2)), rtol=1e-5, atol=1e-7)


def test_sources_cover_every_patch_once(siglip384_ov):
    model, processor = siglip384_ov
    with illava.applied(
        model, illava_vit_k="5-6-7-8", illava_vit_r=92, illava_track_vit_source=True, processor=processor, **VIT
    ):
        model(**image_prompt(processor, random_image(300, 700)))
        entry = illava.last_trace(model).vision[0]
    source_map = entry.source_map()
    assert source_map.shape == (entry.num_groups, 27, 27)
    assert int(source_map.min()) == 0 and int(source_map.max()) == 360
    # every survivor stands for at least its own patch
    for group in range(entry.num_groups):
        assert torch.equal(torch.unique(source_map[group]), torch.arange(361))
        assert torch.equal(entry.sources[group, entry.positions[group]], torch.arange(361))


# -- generation -----------------------------------------------------------------------------------------


def test_generate_with_merging_for_image_images_video_and_padded_batch(siglip384_ov):
    model, processor = siglip384_ov
    with illava.applied(model, illava_vit_k="3-4-5-6", illava_vit_r=92, processor=processor, **VIT):
        cases = [
            image_prompt(processor, random_image(300, 500)),
            image_prompt(processor, [random_image(384, 384, seed=1), random_image(200, 400, seed=2)]),
            processor(videos=random_video(3), text="<video>what", return_tensors="pt"),
            processor(
                images=[random_image(384, 384, seed=1), random_image(200, 600, seed=2)],
                text=["<image>short", "<image>a much longer prompt"],
                padding=True,
                return_tensors="pt",
            ),
        ]
        for inputs in cases:
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert generated.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 4)
            assert illava.last_trace(model).vision[0].tokens_per_group[-1] == 361


def test_batch_matches_samples_alone(siglip384_ov):
    model, processor = siglip384_ov
    images = [random_image(384, 384, seed=1), random_image(200, 600, seed=2)]
    texts = ["<image>short", "<image>a much longer prompt"]
    with illava.applied(model, illava_vit_k="5-6-7-8", illava_vit_r=92, processor=processor, **VIT):
        batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
        batched = logits_of(model, batch)[:, -1]
        for index in range(2):
            alone = processor(images=[images[index]], text=[texts[index]], return_tensors="pt")
            torch.testing.assert_close(batched[index], logits_of(model, alone)[0, -1], rtol=1e-4, atol=1e-4)


# -- errors ---------------------------------------------------------------------------------------------


def test_bad_configs_against_the_model_raise_clear_errors(small_ov):
    model, processor = small_ov
    with pytest.raises(ValueError, match="illava_vit_r=8 on 2 layers leaves 0 of 16 tokens"):
        illava.apply(model, illava_vit_k="1-2", illava_vit_r=8, **VIT)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        model.config.vision_feature_layer = -3  # hidden state 4 = output of layer 3
        try:
            illava.apply(model, illava_vit_k="1-4", illava_vit_r=1, **VIT)
        finally:
            model.config.vision_feature_layer = -1
    assert not illava.is_applied(model)
    for layer in model.model.vision_tower.encoder.layers:
        assert "forward" not in vars(layer)


def test_unpatched_processor_gets_a_clear_error(small_ov):
    model, processor = small_ov
    inputs = image_prompt(processor, random_image(56, 56))  # counted for unmerged features
    with illava.applied(model, illava_vit_k="1-2", illava_vit_r=2, **VIT):
        with pytest.raises(ValueError, match="processor=processor"):
            model(**inputs)


@pytest.mark.parametrize("r", [92, 90, 0])
def test_recorded_feature_index_matches_the_real_layout(siglip384_ov, r):
    """Push survivor ids through the model's own layout code and compare with `VisionTrace.features`."""
    model, processor = siglip384_ov
    inner = model.model
    with illava.applied(model, illava_vit_k="5-6-7-8", illava_vit_r=r, processor=processor, **VIT):
        for images in ([random_image(300, 700)], [random_image(384, 384, seed=1), random_image(200, 400, seed=2)]):
            inputs = image_prompt(processor, images)
            model(**inputs)
            entry = illava.last_trace(model).vision[0]
            groups, tokens = entry.positions.shape
            ids = torch.arange(groups * tokens, dtype=torch.float64).view(groups, tokens, 1)
            per_image = torch.split(ids, entry.groups_per_item)
            packed, _ = inner.pack_image_features(
                per_image, inputs["image_sizes"], image_newline=torch.tensor([-1.0], dtype=torch.float64)
            )
            starts = torch.tensor([0] + [len(p) for p in packed]).cumsum(0)
            flat = torch.cat(packed)[:, 0]
            item = torch.repeat_interleave(torch.arange(len(packed)), torch.tensor(entry.groups_per_item))
            landed = entry.features >= 0
            where = (starts[item][:, None] + entry.features)[landed]
            assert torch.equal(flat[where], ids[..., 0][landed])
            assert int(landed.sum()) == int((flat >= 0).sum())  # every non-newline feature holds one survivor


@pytest.mark.parametrize("vit", [False, True])
def test_video_pool_stride_one_keeps_every_frame_token(siglip384_ov, vit):
    model, processor = siglip384_ov
    model.config.mm_spatial_pool_stride = 1
    try:
        options = dict(VIT, illava_vit_k="3-4-5-6", illava_vit_r=92) if vit else {}
        with illava.applied(model, processor=processor, **options):
            inputs = processor(videos=random_video(2), text="<video>what", return_tensors="pt")
            per_frame = 361 if vit else 729
            assert count(inputs, model.config.video_token_id) == 2 * per_frame + 1
            output = model(**inputs)
            assert video_features(output).shape[0] == 2 * per_frame + 1
            assert illava.last_trace(model).vision[0].features.max() == 2 * per_frame - 1
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        del model.config.mm_spatial_pool_stride
    with pytest.raises(ValueError, match="mm_spatial_pool_stride=0"):
        model.config.mm_spatial_pool_stride = 0
        try:
            illava.apply(model, processor=processor, **VIT)
        finally:
            del model.config.mm_spatial_pool_stride
