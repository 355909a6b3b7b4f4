"""One small patched-model case per supported family, for the tests that hold on every family (threads,
torch.compile): `(model, processor, call, settings)`, where `call(module, seed)` runs `module` (the model, or a
compiled wrapper of it) on the seed's input and returns its main output tensor, and `settings` merge in it."""

import torch
from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

from illava.tools.tiny_models import tiny_llava_onevision, tiny_qwen2_vl, tiny_qwen3_vl

from .conftest import random_image
from .test_llava_vit_model import patches_for, random_model, tiny_config
from .test_packing_encoders import packed_input, random_encoder

QWEN_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>describe"
BOTH_STAGES = dict(enable_illava_vit=True, illava_vit_k="2-3", illava_vit_r=0.3, enable_illava_llm=True,
                   illava_llm_k="2", illava_llm_r=0.5)


def vlm(build, prompt):
    model, processor = build()

    def call(module, seed):
        size = (56 + 14 * (seed % 3), 70 + 14 * (seed % 4))
        inputs = processor(images=[random_image(*size, seed=seed)], text=prompt, return_tensors="pt")
        with torch.no_grad():
            return module(**inputs).logits
    return model, processor, call, BOTH_STAGES


def siglip2():
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                 patch_size=8, num_patches=64)
    torch.manual_seed(0)
    model = Siglip2VisionModel(config).eval()
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=64)

    def call(module, seed):
        inputs = processor(images=[random_image(32 + 8 * (seed % 4), 48, seed=seed)], return_tensors="pt")
        with torch.no_grad():
            return module(**inputs).last_hidden_state
    return model, None, call, dict(enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=0.3)


def llava_vit():
    grids = [torch.tensor([[1, 4, 6]]), torch.tensor([[2, 4, 4], [1, 6, 4]])]

    def call(module, seed):
        grid = grids[seed % len(grids)]
        with torch.no_grad():
            return module(patches_for(grid, seed=seed), grid).last_hidden_state
    return random_model(tiny_config()), None, call, dict(enable_illava_vit=True, illava_vit_k="0-1", illava_vit_r=0.25)


def aimv2():
    def call(module, seed):
        _, patches, grid = packed_input(seed=seed)
        with torch.no_grad():
            return module(patches, grid).last_hidden_state
    return random_encoder("aimv2"), None, call, dict(enable_illava_vit=True, illava_vit_k="1", illava_vit_r=0.3)


FAMILIES = {
    "llava_onevision": lambda: vlm(lambda: tiny_llava_onevision(image_size=56, vision_layers=6), "<image>describe"),
    "qwen2_vl": lambda: vlm(tiny_qwen2_vl, QWEN_PROMPT),
    "qwen3_vl": lambda: vlm(tiny_qwen3_vl, QWEN_PROMPT),
    "siglip2": siglip2,
    "llava_vit": llava_vit,
    "aimv2": aimv2,
}
