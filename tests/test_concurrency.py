"""Threads (a web server's workers, an eval harness's thread pool) calling one patched model at once: every call
gets the result it gets alone, and each thread's `last_trace` is that of its own last call."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

import illava
from illava.tiny_models import tiny_llava_onevision, tiny_qwen2_vl, tiny_qwen3_vl

from .conftest import random_image
from .test_llava_vit_model import patches_for, random_model, tiny_config
from .test_packing_encoders import packed_input, random_encoder

CALLS, THREADS = 12, 4
VIT = dict(enable_illava_vit=True, illava_vit_k="2-3", illava_vit_r=0.3)
BOTH = dict(VIT, enable_illava_llm=True, illava_llm_k="2", illava_llm_r=0.5)


def vlm(build, prompt):
    model, processor = build()

    def call(seed):
        size = (56 + 14 * (seed % 3), 70 + 14 * (seed % 4))
        inputs = processor(images=[random_image(*size, seed=seed)], text=prompt, return_tensors="pt")
        with torch.no_grad():
            return model(**inputs).logits
    return model, processor, call, BOTH


def siglip2():
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                 patch_size=8, num_patches=64)
    torch.manual_seed(0)
    model = Siglip2VisionModel(config).eval()
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=64)

    def call(seed):
        inputs = processor(images=[random_image(32 + 8 * (seed % 4), 48, seed=seed)], return_tensors="pt")
        with torch.no_grad():
            return model(**inputs).last_hidden_state
    return model, None, call, dict(enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=0.3)


def packed(model, grids):
    def call(seed):
        grid = grids[seed % len(grids)]
        with torch.no_grad():
            return model(patches_for(grid, seed=seed), grid)
    return call


def llava_vit():
    model = random_model(tiny_config())
    grids = [torch.tensor([[1, 4, 6]]), torch.tensor([[2, 4, 4], [1, 6, 4]])]
    output = packed(model, grids)
    return model, None, lambda seed: output(seed).last_hidden_state, dict(enable_illava_vit=True, illava_vit_k="0-1",
                                                                          illava_vit_r=0.25)


def aimv2():
    model = random_encoder("aimv2")

    def call(seed):
        _, patches, grid = packed_input(seed=seed)
        with torch.no_grad():
            return model(patches, grid).last_hidden_state
    return model, None, call, dict(enable_illava_vit=True, illava_vit_k="1", illava_vit_r=0.3)


FAMILIES = {
    "llava_onevision": lambda: vlm(lambda: tiny_llava_onevision(image_size=56, vision_layers=6), "<image>describe"),
    "qwen2_vl": lambda: vlm(tiny_qwen2_vl, "<|vision_start|><|image_pad|><|vision_end|>describe"),
    "qwen3_vl": lambda: vlm(tiny_qwen3_vl, "<|vision_start|><|image_pad|><|vision_end|>describe"),
    "siglip2": siglip2,
    "llava_vit": llava_vit,
    "aimv2": aimv2,
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_concurrent_calls_equal_calls_alone(family):
    model, processor, call, settings = FAMILIES[family]()
    with illava.applied(model, processor=processor, **settings):
        alone = {}
        for seed in range(CALLS):
            alone[seed] = (call(seed), [entry.tokens_per_group for entry in illava.last_trace(model).vision])

        def in_thread(seed):
            output = call(seed)
            return output, [entry.tokens_per_group for entry in illava.last_trace(model).vision]

        with ThreadPoolExecutor(THREADS) as pool:
            together = dict(zip(range(CALLS), pool.map(in_thread, range(CALLS))))
    for seed in range(CALLS):
        (expected, expected_counts), (output, counts) = alone[seed], together[seed]
        assert counts == expected_counts, seed
        assert expected_counts[0][-1] < expected_counts[0][0]  # it merged
        torch.testing.assert_close(output, expected, rtol=0, atol=0, equal_nan=True)


def test_concurrent_generate_equals_generate_alone():
    model, processor = tiny_qwen2_vl()
    prompt = "<|vision_start|><|image_pad|><|vision_end|>describe"

    def generate(seed):
        inputs = processor(images=[random_image(56 + 14 * (seed % 3), 84, seed=seed)], text=prompt + "!" * seed,
                           return_tensors="pt")
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=4, do_sample=False)

    with illava.applied(model, processor=processor, **BOTH):
        alone = [generate(seed) for seed in range(6)]
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(generate, range(6)))
    for expected, tokens in zip(alone, together):
        assert torch.equal(tokens, expected)
