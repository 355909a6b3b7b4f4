"""One module per model family, each with its `FAMILY` (an `illava.registry.Family`)."""

from __future__ import annotations


def builtin_families():
    from . import llava_onevision, llava_vit, packing_encoders, qwen2_vl, qwen3_vl, siglip2

    return [module.FAMILY for module in (llava_onevision, qwen2_vl, qwen3_vl, llava_vit, siglip2, packing_encoders)]
