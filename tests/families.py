"""One small case per supported model family (and per model class with a layout of its own), for the tests that
hold on every family: the contract (`test_contract.py`), threads, torch.compile.

`FAMILIES[name]()` builds a fresh `Case`: the model, the processor to pass to `illava.apply` (None where the family
leaves processors alone), `call(module, seed, video=False)` which runs `module` (the model, or a compiled wrapper
of it) on the input of that seed and returns its output tensor(s), `settings` that merge in it (both stages where the
family has a language model), the depth of its vision encoder and of its language model (None: no LLM stage),
`probes`: the keyword sets of `call` that together cover its inputs (images and videos), and the first decoder layer
the LLM stage may merge at."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel
from transformers.video_utils import VideoMetadata

from .conftest import QWEN_IMAGE, QWEN_VIDEO, random_image, random_video, tiny_ov, tiny_qwen2, tiny_qwen3
from .test_llava_vit_model import patches_for, random_model, tiny_config
from .test_packing_encoders import packed_input, random_encoder

QWEN_PROMPT = QWEN_IMAGE + "describe"
BOTH_STAGES = dict(enable_illava_vit=True, illava_vit_k="2-3", illava_vit_r=0.3, enable_illava_llm=True,
                   illava_llm_k="2", illava_llm_r=0.5)
VIT_STAGE = dict(enable_illava_vit=True, illava_vit_k="2-3", illava_vit_r=0.3)
# Qwen3.5's decoder: linear-attention layers 0-2 and 4-5, full attention at 3 (scores the merge at 4)
QWEN3_5_STAGES = dict(VIT_STAGE, enable_illava_llm=True, illava_llm_k="4", illava_llm_r=0.5)
IMAGE_AND_VIDEO = ({"seed": 0}, {"seed": 1, "video": True})


class Case(NamedTuple):
    model: Any
    processor: Any
    call: Callable[..., Any]
    settings: dict[str, Any]
    vit_layers: int
    llm_layers: int | None
    probes: tuple[dict[str, Any], ...] = ({"seed": 0}, {"seed": 1})
    generates: bool = False  # whether `call` takes `generate=True` (greedy tokens instead of the forward's output)
    first_llm_layer: int = 1  # after the first full-attention layer (Qwen3.5's hybrid decoder)


def image_size(seed: int) -> tuple[int, int]:
    return 56 + 14 * (seed % 3), 70 + 14 * (seed % 4)


def run_vlm(module, inputs, generate: bool) -> torch.Tensor:
    with torch.no_grad():
        if generate:
            return module.generate(**inputs, max_new_tokens=3, do_sample=False)
        return module(**inputs).logits


def llava_onevision() -> Case:
    model, processor = tiny_ov(image_size=56, vision_layers=6, text_layers=4)

    def call(module, seed, video=False, generate=False):
        extra = dict(videos=[random_video(3, seed=seed)]) if video else {}
        inputs = processor(images=[[random_image(*image_size(seed), seed=seed)]], return_tensors="pt",
                           text="<image>" + "<video>" * bool(video) + "describe", **extra)
        return run_vlm(module, inputs, generate)
    return Case(model, processor, call, BOTH_STAGES, 6, 4, IMAGE_AND_VIDEO, generates=True)


def qwen(build: Callable[[], tuple[Any, Any]], timestamps: bool = False, settings=BOTH_STAGES,
         first_llm_layer: int = 1) -> Case:
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (`timestamps`: the video processor takes `video_metadata`)."""
    model, processor = build()

    def call(module, seed, video=False, generate=False):
        extra = {}
        if video:
            frames = random_video(4, 84, 112, seed=seed)
            extra["videos"] = [frames]
            if timestamps:
                extra["video_metadata"] = [VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])]
        inputs = processor(images=[random_image(*image_size(seed), seed=seed)], return_tensors="pt",
                           text=QWEN_IMAGE + QWEN_VIDEO * bool(video) + "describe", **extra)
        return run_vlm(module, inputs, generate)
    return Case(model, processor, call, settings, 6, 6, IMAGE_AND_VIDEO, generates=True,
                first_llm_layer=first_llm_layer)


def siglip2() -> Case:
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                 patch_size=8, num_patches=64, vision_use_head=True)
    torch.manual_seed(0)
    model = Siglip2VisionModel(config).eval()
    image_processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=64)

    def call(module, seed, video=False):
        images = [random_image(32 + 8 * (seed % 4), 48, seed=seed)]
        if seed % 2:  # a padded batch of two sizes
            images.append(random_image(64, 40, seed=seed + 1))
        inputs = image_processor(images=images, return_tensors="pt")
        with torch.no_grad():
            output = module(**inputs)
        return output.last_hidden_state, output.pooler_output
    return Case(model, None, call, dict(enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=0.3), 4, None)


def llava_vit() -> Case:
    grids = [torch.tensor([[1, 4, 6]]), torch.tensor([[2, 4, 4], [1, 6, 4]])]  # an image; a video and an image

    def call(module, seed, video=False):
        grid = grids[seed % len(grids)]
        with torch.no_grad():
            output = module(patches_for(grid, seed=seed), grid)
        return output.last_hidden_state, output.pooler_output
    model = random_model(tiny_config(num_hidden_layers=3, use_head=True))
    return Case(model, None, call, dict(enable_illava_vit=True, illava_vit_k="0-1", illava_vit_r=0.25), 3, None)


def packing_encoder(name: str) -> Case:
    """AIMv2, DINOv3 and SigLIP2 NaFlex as packing encoders (`illava.models`): 3 layers, images of four sizes and
    one row of two frames in one packed call."""
    def call(module, seed, video=False):
        _, patches, grid = packed_input(seed=seed)
        with torch.no_grad():
            output = module(patches, grid)
        return output.last_hidden_state, output.pooler_output
    return Case(random_encoder(name), None, call, dict(enable_illava_vit=True, illava_vit_k="1", illava_vit_r=0.3), 3,
                None)


FAMILIES: dict[str, Callable[[], Case]] = {
    "llava_onevision": llava_onevision,
    "qwen2_vl": lambda: qwen(tiny_qwen2),
    "qwen2_5_vl": lambda: qwen(lambda: tiny_qwen2(model_class="Qwen2_5_VLForConditionalGeneration")),
    "qwen3_vl": lambda: qwen(tiny_qwen3, timestamps=True),
    "qwen3_vl_moe": lambda: qwen(lambda: tiny_qwen3(moe=True), timestamps=True),
    "qwen3_5": lambda: qwen(lambda: tiny_qwen3(qwen3_5=True, rotary_fraction=0.5), timestamps=True,
                            settings=QWEN3_5_STAGES, first_llm_layer=4),
    "siglip2": siglip2,
    "llava_vit": llava_vit,
    "aimv2": lambda: packing_encoder("aimv2"),
    "dinov3": lambda: packing_encoder("dinov3"),
    "siglip2_packing": lambda: packing_encoder("siglip2"),
}
