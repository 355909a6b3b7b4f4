"""The reference's merge modes (drop / shift / pivot) on every supported model and both stages: the same token
counts as the default merge, working generate and heatmap sources, and the expected effect on the values."""

import pytest
import torch

import illava
from illava import IllavaConfig
from illava.tools.tiny_models import tiny_llava_onevision
from illava.visualize.sources import write_heatmaps

from .conftest import random_image, random_video, tiny_qwen2
from .test_llava_vit_model import patches_for, random_model, tiny_config
from .test_siglip2 import naflex, run  # noqa: F401  (fixture)

MODES = ["drop", "shift", "pivot"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def ov():
    return tiny_llava_onevision(image_size=56, vision_layers=6, text_layers=4)


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2()


def counts(trace):
    return [entry.tokens_per_group for entry in trace.vision], [layer.visual_tokens_per_span for layer in trace.language]


def both_stages(mode, **extra):
    return dict(enable_illava_vit=True, enable_illava_llm=True, illava_llm_k="2-3", illava_llm_r=0.5,
                illava_vit_mode=mode, illava_llm_mode=mode, illava_pc_ratio=0.3, illava_track_vit_source=True,
                illava_track_llm_source=True, **extra)


@pytest.mark.parametrize("mode", MODES)
def test_llava_onevision_both_stages(ov, mode, tmp_path):
    model, processor = ov
    samples = [random_image(40, 90, seed=1), random_image(56, 56, seed=2)]
    results = {}
    for name in ("merge", mode):
        with illava.applied(model, processor=processor, illava_vit_k="1-2", illava_vit_r=3, **both_stages(name)):
            inputs = processor(images=[[image] for image in samples], text=["<image>describe", "<image>what is it"],
                               padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            free = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
            trace = illava.last_trace(model)
            results[name] = counts(trace)
            assert torch.equal(out, free)  # cache or not, the same answer in every mode
            _, positions = trace.llm_source_map(0)
            if mode in ("drop", "pivot") and name == mode:
                assert bool((positions < 0).any()) or mode == "pivot"  # dropped patches: no token stands for them
            assert write_heatmaps(model, processor, inputs, trace, tmp_path / name)
    assert results[mode] == results["merge"]


@pytest.mark.parametrize("mode", MODES)
def test_qwen2_vl_both_stages(qwen, mode):
    model, processor = qwen
    results = {}
    for name in ("merge", mode):
        with illava.applied(model, processor=processor, illava_vit_k="2-3", illava_vit_r=3, **both_stages(name)):
            inputs = processor(images=[random_image(100, 150)], videos=[random_video(4, 84, 112)],
                               text=QWEN_IMAGE + "<|vision_start|><|video_pad|><|vision_end|>describe",
                               return_tensors="pt")
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            results[name] = counts(illava.last_trace(model))
            illava.last_trace(model).llm_source_map(0)
    assert results[mode] == results["merge"]


@pytest.mark.parametrize("mode", MODES)
def test_packed_and_naflex_encoders(naflex, mode):  # noqa: F811
    encoder = random_model(tiny_config(num_hidden_layers=4, use_head=True))
    grid = torch.tensor([[1, 4, 6], [3, 4, 4]])
    patches = patches_for(grid)
    siglip2, processor = naflex
    images = [random_image(40, 90, seed=1), random_image(64, 64, seed=2)]
    found = {}
    for name in ("merge", mode):
        options = dict(enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=4, illava_vit_mode=name,
                       illava_track_vit_source=True)
        with torch.no_grad(), illava.applied(encoder, **options):
            encoder(patches, grid)
            packed = [entry.tokens_per_group for entry in illava.last_trace(encoder).vision]
        with illava.applied(siglip2, **options):
            run(siglip2, processor, images)
            padded = [entry.tokens_per_group for entry in illava.last_trace(siglip2).vision]
            illava.last_trace(siglip2).vision[0].source_map()
        found[name] = (packed, padded)
    assert found[mode] == found["merge"]


def test_modes_change_values_as_each_mode_says(ov):
    """Same survivors count; "drop" leaves survivors' values as they were, the merges do not."""
    model, processor = ov
    image = random_image(56, 56, seed=4)
    outputs = {}
    for mode in ("merge", "drop"):
        with illava.applied(model, processor=processor, enable_illava_vit=True, illava_vit_k="5", illava_vit_r=6,
                            illava_vit_mode=mode):
            inputs = processor(images=[[image]], text="<image>x", return_tensors="pt")
            pixels = inputs["pixel_values"][0]
            with torch.no_grad():
                outputs[mode] = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            positions = illava.last_trace(model).vision[0].positions
    with torch.no_grad():
        full = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert torch.equal(outputs["drop"][5], full[5])  # before merge layer 5 nothing differs
    assert outputs["drop"][-1].shape == outputs["merge"][-1].shape  # same survivors count, different values
    assert not torch.allclose(outputs["drop"][-1], outputs["merge"][-1])
    assert positions.shape[1] == 16 - 6


@pytest.mark.parametrize(
    "value, expected", [(1, "drop"), ("2", "shift"), (3, "pivot"), ("Merge", "merge"), ("pivot", "pivot")]
)
def test_modes_parse_from_names_and_the_references_integers(value, expected):
    config = IllavaConfig(illava_vit_mode=value, illava_llm_mode=value)
    assert config.illava_vit_mode == expected and config.illava_llm_mode == expected


@pytest.mark.parametrize(
    "options, fragment",
    [({"illava_vit_mode": 4}, "illava_vit_mode=4 is not a merge mode"),
     ({"illava_llm_mode": "squash"}, "illava_llm_mode='squash'"),
     ({"illava_pc_ratio": 0}, "illava_pc_ratio=0 must lie in"), ({"illava_pc_ratio": "x"}, "illava_pc_ratio='x'")],
)
def test_bad_modes_are_named(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        IllavaConfig(**options)
