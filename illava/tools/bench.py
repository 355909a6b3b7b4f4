"""Efficiency benchmark: visual tokens, FLOPs, vision / prefill / decode time, throughput and peak memory of
baseline vs iLLaVA settings, measured side by side in one process (interleaved rounds after a warm-up; times of the
fastest round, ratios the median of each round's ratio to its own baseline run).

    python -m illava.tools.bench --geometry llava-ov-7b-cpu            # reduced width, runs on a CPU in minutes
    python -m illava.tools.bench --geometry llava-ov-7b --device cuda --dtype bfloat16 --attn sdpa
    python -m illava.tools.bench --geometry qwen3-vl-8b-cpu            # Qwen3-VL-8B's depths, 1/8 of its width
    python -m illava.tools.bench --geometry qwen3-vl-8b-quarter        # ... 1/4 of its width
    python -m illava.tools.bench --geometry llava-ov-7b-cpu --video-frames 8,16,32 --memory-budget-gib 4

Random weights of the real shapes: timings and memory are real, answers are not. Each merged figure is given as a ratio to the baseline and as a fraction of the FLOPs-predicted speed-up, the
limit merging could reach if time followed FLOPs. The share of prefill spent scoring and merging is reported too.
Writes JSON, a markdown table and plots to `--output_dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import api, merge
from ..config import IllavaConfig
from ..patches import decoder, llava_vit, packed, packing_encoders, qwen_vision
from ..registry import find_family
from .cli import ATTN_IMPLEMENTATIONS, CliError, check_device_and_attention
from .measure import PeakMemory, on_cuda, stage_spans, synchronize

logger = logging.getLogger(__name__)

SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)
QWEN2_VIT = dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4)
# Qwen2.5-VL's tower: SwiGLU MLP, attention windows of 112 pixels but in four blocks, RMSNorm
QWEN2_5_VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31])
QWEN2_TEXT = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4),
}
# Qwen3-VL's vision towers (patch 16, DeepStack features from three blocks) and Qwen3 text models (head_dim 128)
QWEN3_VIT = {
    "2b": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=[5, 11, 17]),
    "8b": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16, 24]),
}
QWEN3_TEXT = {
    "2b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
               num_key_value_heads=8, head_dim=128),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128),
}
# Qwen3.5: transformers' `Qwen3_5Config` defaults (its documented checkpoint's shapes): Qwen3-VL-8B's tower without
# DeepStack, 32 decoder layers with gated full attention at every 4th (3, 7, ...; head_dim 256, a quarter of it
# rotated) and Gated-DeltaNet linear attention elsewhere
QWEN3_5_VIT = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16)
QWEN3_5_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                    num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                    linear_key_head_dim=128, linear_value_head_dim=128)
# name: (family, vision shape, text shape, width divisor for a CPU-sized version)
GEOMETRIES = {
    "llava-ov-0.5b": ("llava_onevision", SIGLIP_SO400M, QWEN2_TEXT["0.5b"], 1),
    "llava-ov-7b": ("llava_onevision", SIGLIP_SO400M, QWEN2_TEXT["7b"], 1),
    "llava-ov-7b-cpu": ("llava_onevision", SIGLIP_SO400M, QWEN2_TEXT["7b"], 8),
    "qwen2-vl-2b": ("qwen2_vl", QWEN2_VIT, QWEN2_TEXT["1.5b"], 1),
    "qwen2-vl-7b": ("qwen2_vl", QWEN2_VIT, QWEN2_TEXT["7b"], 1),
    "qwen2-vl-7b-cpu": ("qwen2_vl", QWEN2_VIT, QWEN2_TEXT["7b"], 8),
    "qwen2.5-vl-7b": ("qwen2_vl", QWEN2_5_VIT, QWEN2_TEXT["7b"], 1),
    "qwen2.5-vl-7b-cpu": ("qwen2_vl", QWEN2_5_VIT, QWEN2_TEXT["7b"], 8),
    "qwen3-vl-2b": ("qwen3_vl", QWEN3_VIT["2b"], QWEN3_TEXT["2b"], 1),
    "qwen3-vl-2b-cpu": ("qwen3_vl", QWEN3_VIT["2b"], QWEN3_TEXT["2b"], 8),
    "qwen3-vl-8b": ("qwen3_vl", QWEN3_VIT["8b"], QWEN3_TEXT["8b"], 1),
    "qwen3-vl-8b-cpu": ("qwen3_vl", QWEN3_VIT["8b"], QWEN3_TEXT["8b"], 8),
    # twice the CPU width: how the fraction of the FLOPs limit moves as per-token work grows against fixed costs
    "qwen3-vl-8b-quarter": ("qwen3_vl", QWEN3_VIT["8b"], QWEN3_TEXT["8b"], 4),
    "qwen3.5": ("qwen3_5", QWEN3_5_VIT, QWEN3_5_TEXT, 1),
    "qwen3.5-cpu": ("qwen3_5", QWEN3_5_VIT, QWEN3_5_TEXT, 8),
}
SETTINGS = {
    "llava_onevision": {
        "baseline": {},
        "vit 5-6-7-8 r92": dict(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=92),
        "llm 8 keep .70": dict(enable_illava_llm=True, illava_llm_k="8", illava_llm_r=0.70),
        "both (paper)": dict(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=92,
                             enable_illava_llm=True, illava_llm_k="8", illava_llm_r=0.70),
    },
    "qwen2_vl": {
        "baseline": {},
        "vit 12-15 r.16": dict(enable_illava_vit=True, illava_vit_k="12-13-14-15", illava_vit_r=0.16),
        "llm 6-8 keep .90": dict(enable_illava_llm=True, illava_llm_k="6-7-8", illava_llm_r=0.90),
        "both (VLMEvalKit)": dict(enable_illava_vit=True, illava_vit_k="12-13-14-15", illava_vit_r=0.16,
                                  enable_illava_llm=True, illava_llm_k="6-7-8", illava_llm_r=0.90),
    },
    # the reference's Qwen3-VL settings in illava's terms (its kept fraction 0.90 / 0.85 per ViT layer = r 0.10 /
    # 0.15 merged away); the VLMEvalKit one with its mode 3 (pivot) in both stages
    "qwen3_vl": {
        "baseline": {},
        "vit 5-8 r.10": dict(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=0.10),
        "llm 15-21 keep .85": dict(enable_illava_llm=True, illava_llm_k="15-17-19-21", illava_llm_r=0.85),
        "both (VLMEvalKit, pivot)": dict(enable_illava_vit=True, illava_vit_k="2-3-4-5-6-7-8", illava_vit_r=0.15,
                                         enable_illava_llm=True, illava_llm_k="19-21-23-25", illava_llm_r=0.70,
                                         illava_vit_mode="pivot", illava_llm_mode="pivot"),
    },
}
# Qwen3.5 (no reference setting): the Qwen3-VL ViT setting; LLM merges right after full-attention layers 15, 19, 23,
# which score them
SETTINGS["qwen3_5"] = {
    "baseline": {},
    "vit 5-8 r.10": dict(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=0.10),
    "llm 16-20-24 keep .85": dict(enable_illava_llm=True, illava_llm_k="16-20-24", illava_llm_r=0.85),
    "both": dict(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=0.10,
                 enable_illava_llm=True, illava_llm_k="16-20-24", illava_llm_r=0.85),
}
VIDEO_SETTINGS = {
    "baseline": {},
    "video (paper)": dict(enable_illava_vit=True, illava_vit_k="3-4-5-6", illava_vit_r=92,
                          enable_illava_llm=True, illava_llm_k="2", illava_llm_r=0.70),
}


def _scaled(shape: dict, divisor: int) -> dict:
    """Divide head counts and MLP width (not depth, not head_dim), keeping the key/value heads dividing the
    query heads; the width follows as heads x head_dim."""
    if divisor == 1:
        return dict(shape)
    scaled = dict(shape)
    width_key = "embed_dim" if "embed_dim" in shape else "hidden_size"
    heads_key = "num_heads" if "num_heads" in shape else "num_attention_heads"
    head_dim = shape[width_key] // shape[heads_key]
    scaled[heads_key] = max(1, shape[heads_key] // divisor)
    scaled[width_key] = scaled[heads_key] * head_dim
    if "num_key_value_heads" in shape:
        scaled["num_key_value_heads"] = 1
    for linear_heads in ("linear_num_key_heads", "linear_num_value_heads"):  # Qwen3.5's Gated-DeltaNet
        if linear_heads in shape:
            scaled[linear_heads] = max(1, shape[linear_heads] // divisor)
    if "intermediate_size" in shape:
        scaled["intermediate_size"] = max(1, shape["intermediate_size"] // divisor)
    return scaled


def build_model(geometry: str, device: str, dtype: torch.dtype, attn: str):
    """A random-weight model of a named geometry and its (offline, byte-level) processor."""
    import transformers

    from .tiny_models import SPECIAL_TOKENS, byte_level_tokenizer, tiny_llava_onevision, tiny_qwen2_vl, tiny_qwen3_vl

    family, vision, text, divisor = GEOMETRIES[geometry]
    vision, text = _scaled(vision, divisor), _scaled(text, divisor)
    tokenizer = byte_level_tokenizer()
    text = dict(text, vocab_size=len(tokenizer), max_position_embeddings=32768)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    if family == "llava_onevision":
        _, processor = tiny_llava_onevision(image_size=384, vision_layers=1, text_layers=1)
        config = transformers.LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", image_size=384, patch_size=14,
                               vision_use_head=False, **vision),
            text_config=dict(model_type="qwen2", **text),
            image_token_index=ids["<image>"], video_token_index=ids["<video>"],
            image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
            vision_feature_layer=-1, vision_feature_select_strategy="full",
        )
        model_class = transformers.LlavaOnevisionForConditionalGeneration
    elif family == "qwen3_5":
        _, processor = tiny_qwen3_vl(vision_depth=1, text_layers=1, deepstack_layers=(0,),
                                     max_pixels=16384 * 32 * 32)
        head_dim = text["head_dim"]
        config = transformers.Qwen3_5Config(
            vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                               out_hidden_size=text["hidden_size"], **vision),
            text_config=dict(rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                              "mrope_section": [head_dim // 24 + 1, head_dim // 24 + 1, head_dim // 24],
                                              "mrope_interleaved": True},
                             layer_types=[("full_attention" if index % 4 == 3 else "linear_attention")
                                          for index in range(text["num_hidden_layers"])], **text),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        model_class = transformers.Qwen3_5ForConditionalGeneration
    elif family == "qwen3_vl":
        _, processor = tiny_qwen3_vl(vision_depth=1, text_layers=1, deepstack_layers=(0,),
                                     max_pixels=16384 * 32 * 32)
        config = transformers.Qwen3VLConfig(
            vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                               out_hidden_size=text["hidden_size"], **vision),
            text_config=dict(rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                              "mrope_interleaved": True}, **text),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        model_class = transformers.Qwen3VLForConditionalGeneration
    else:
        _, processor = tiny_qwen2_vl(vision_depth=1, text_layers=1, max_pixels=16384 * 28 * 28)
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
        section[0] += head_dim // 2 - sum(section)
        windowed = "fullatt_block_indexes" in vision  # Qwen2.5-VL
        out_width = {"out_hidden_size" if windowed else "hidden_size": text["hidden_size"]}
        config = getattr(transformers, "Qwen2_5_VLConfig" if windowed else "Qwen2VLConfig")(
            vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **out_width, **vision),
            text_config=dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                             **text),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        model_class = getattr(transformers, "Qwen2_5_VLForConditionalGeneration" if windowed
                              else "Qwen2VLForConditionalGeneration")
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config)
    model = model.to(dtype).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # always decode the requested number of tokens
    return model, processor, family


# -- FLOPs ---------------------------------------------------------------------------------------------------


def llm_prefill_flops(tokens: int, width: int, mlp: int, kv_width: int, context: int | None = None,
                      gated: bool = False) -> float:
    """One Qwen2 decoder layer over `tokens` queries attending to `context` keys (default: causal self, L(L+1)/2):
    q and o (width^2), k and v (width x kv_width), SwiGLU MLP (3 matmuls), scores and mix; `gated`: q_proj also
    gives an output gate (Qwen3.5)."""
    pairs = tokens * (tokens + 1) / 2 if context is None else tokens * context
    projections = (3 if gated else 2) * width * width + 2 * width * kv_width
    return 2.0 * (tokens * (projections + 3 * width * mlp) + 2 * pairs * width)


def gated_delta_net_flops(tokens: int, width: int, mlp: int, text) -> float:
    """One Qwen3.5 linear-attention layer over `tokens`: the q/k/v, z, b, a and output projections, the recurrence
    (a key x value state per value head, read and updated: about 4 dk dv per token) and the SwiGLU MLP; the short
    convolution and the gates are left out (a few per channel)."""
    key_dim = text.linear_num_key_heads * text.linear_key_head_dim
    value_dim = text.linear_num_value_heads * text.linear_value_head_dim
    projections = width * (2 * key_dim + 2 * value_dim + 2 * text.linear_num_value_heads) + value_dim * width
    recurrence = 4 * text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim
    return 2.0 * tokens * (projections + recurrence + 3 * width * mlp)


def prefill_flops(model, config: IllavaConfig, llm_counts: list[int], counted: dict[str, float],
                  sequences: int = 1) -> dict[str, float]:
    """Vision and LLM prefill FLOPs of a run: the vision tower's and the LLM's outside-layer FLOPs as
    `counted_flops` counted them while it ran, plus the decoder layers' analytic FLOPs for the prompt lengths the
    trace recorded. `llm_counts`: length of each of the `sequences` prompts before the first LLM merge layer and
    after each."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_width = text.num_key_value_heads * head_dim
    llm_merge = config.illava_llm_k if config.enable_illava_llm else ()
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    gated = text.model_type.startswith("qwen3_5")
    llm_flops = counted["llm_prefill"]
    for layer, layer_type in enumerate(layer_types):
        tokens = llm_counts[sum(k <= layer for k in llm_merge)]
        if layer_type == "linear_attention":
            llm_flops += sequences * gated_delta_net_flops(tokens, text.hidden_size, text.intermediate_size, text)
        else:
            llm_flops += sequences * llm_prefill_flops(tokens, text.hidden_size, text.intermediate_size, kv_width,
                                                       gated=gated)
    vision_flops = counted["vision"]
    return {"vision": vision_flops, "llm_prefill": llm_flops, "total": vision_flops + llm_flops}


def _in_layer_list(name: str) -> bool:
    parts = name.split(".")
    return any(part in ("layers", "blocks") and index + 1 < len(parts) and parts[index + 1].isdigit()
               for index, part in enumerate(parts))


def attention_pairs(hidden: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor | int:
    """Query-key pairs a vision attention call computes: per `cu_seqlens` segment (an image, a frame, or a
    Qwen2.5-VL attention window) its length squared; without boundaries, every row of `[rows, tokens, dim]` (or the
    one sequence of `[tokens, dim]`) attends to itself whole."""
    if cu_seqlens is not None:
        return cu_seqlens.diff().long().square().sum()
    tokens = hidden.shape[-2]
    rows = hidden.shape[0] if hidden.dim() == 3 else 1
    return rows * tokens * tokens


@contextlib.contextmanager
def counted_flops(model):
    """FLOPs of a generate()'s prefill counted by hooks as it runs. In the vision tower: every Linear / Conv
    (inside its blocks too, on the tokens each really sees: a merge layer's MLP runs on the tokens it kept) and
    every attention module's scores and mix, 4 x pairs x width (pairs per `attention_pairs`: windowed blocks count
    their windows). In the language model: Linear / Conv modules outside its decoder layers (the head on the
    positions it scores; the layers are counted analytically, `prefill_flops`), during the first forward only.
    Calls outside both spans (e.g. decode steps) are left out, like their time. Yields {"vision", "llm_prefill"},
    filled in when the block exits."""
    counted = {"vision": 0.0, "llm_prefill": 0.0}
    pairs_by_width: list[tuple[torch.Tensor | int, int]] = []
    tower = find_family(model).vision_tower(model)
    in_tower = {id(module) for module in tower.modules()}
    state = {"prefill": False, "done": False}

    def count(module, args, output):
        if isinstance(module, torch.nn.Linear):
            per_output = module.in_features
        else:
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        flops = 2.0 * output.numel() * per_output
        if id(module) in in_tower:
            counted["vision"] += flops
        elif state["prefill"]:
            counted["llm_prefill"] += flops

    def attention(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        pairs_by_width.append((attention_pairs(hidden, kwargs.get("cu_seqlens")), hidden.shape[-1]))

    def enter(module, *unused):
        state["prefill"] = not state["done"]

    def leave(module, *unused):
        state["prefill"], state["done"] = False, True

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    for name, module in model.named_modules():
        matmul = isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        inside_tower, inside_layer = id(module) in in_tower, _in_layer_list(name)
        if matmul and (inside_tower or not inside_layer):
            handles.append(module.register_forward_hook(count))
        elif inside_tower and inside_layer and type(module).__name__.endswith("Attention"):
            handles.append(module.register_forward_pre_hook(attention, with_kwargs=True))
    try:
        yield counted
    finally:
        for handle in handles:
            handle.remove()
        counted["vision"] += sum(4.0 * float(pairs) * width for pairs, width in pairs_by_width)


# -- measurement ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def merge_time(device: str):
    """Time spent scoring and merging (both stages), summed, while the block runs: planning, merging, re-slicing
    and scoring in a pass of its own. Scoring that a merge layer's attention does itself (`scored_attention`) is
    part of that layer's attention time, not counted here."""
    spent = {"seconds": 0.0}
    targets = [(merge, "attention_received"), (merge, "last_query_attention"), (merge, "plan_merge"),
               (merge, "apply_merge"), (decoder, "_compact")]
    targets += [(module, "merge_packed") for module in (packed, qwen_vision, llava_vit, packing_encoders)]
    originals = [(module, name, getattr(module, name)) for module, name in targets]
    depth = {"level": 0}

    def timed(function):
        def wrapper(*args, **kwargs):
            depth["level"] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth["level"] -= 1
                if depth["level"] == 0:  # nested calls count once
                    synchronize(device)
                    spent["seconds"] += time.perf_counter() - start

        return wrapper

    for module, name, function in originals:
        setattr(module, name, timed(function))
    try:
        yield spent
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


@dataclasses.dataclass
class Measurement:
    setting: str
    batch: int
    visual_tokens: dict
    flops: dict
    vision_s: float
    prefill_s: float
    decode_tokens_per_s: float
    end_to_end_s: float
    merge_s: float
    peak_bytes: int


def measure_once(model, processor, family, build_inputs, config: IllavaConfig | None, batch: int, new_tokens: int,
                 device: str, memory: bool = False) -> Measurement:
    """One timed generate(): vision encoder (hooks), prefill (first forward), decode (the rest). `memory`: its
    peak memory instead (its timings then include the memory profiler's overhead)."""
    if config is not None:
        api.apply(model, config, processor=processor)
    try:
        inputs = build_inputs(batch)
        peak = PeakMemory(device) if memory else contextlib.nullcontext()
        with torch.no_grad(), stage_spans(model, device) as spans, peak, merge_time(device) as merging, \
                counted_flops(model) as counted:
            synchronize(device)
            begin = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            synchronize(device)
            end_to_end = time.perf_counter() - begin
        trace = api.last_trace(model) if config is not None else None
        visual = _visual_tokens(model, inputs, trace)
        flops = prefill_flops(model, config or IllavaConfig(), visual["llm_sequence"], counted, sequences=batch)
    finally:
        if config is not None:
            api.remove(model)
    vision = sum(b - a for a, b in spans["vision"])
    prefill = spans["forward"][0][1] - spans["forward"][0][0]
    decode = sum(b - a for a, b in spans["forward"][1:])
    return Measurement(
        setting="", batch=batch, visual_tokens=visual, flops=flops, vision_s=vision, prefill_s=prefill,
        decode_tokens_per_s=batch * (new_tokens - 1) / decode if decode else float("nan"),
        end_to_end_s=end_to_end, merge_s=merging["seconds"], peak_bytes=peak.bytes if memory else 0,
    )


def _visual_tokens(model, inputs, trace) -> dict:
    ids = inputs["input_ids"]
    visual = int(((ids == model.config.image_token_id) | (ids == model.config.video_token_id)).sum())
    result = {"llm_visual_input": visual, "llm_sequence": [int(ids.shape[1])]}
    if trace is not None and trace.vision:
        first = trace.vision[0]
        tokens_per_unit = first.window**2  # Qwen2-VL counts 2x2 windows
        result.update(vit_per_group=[count * tokens_per_unit for count in first.tokens_per_group],
                      vit_groups=sum(entry.num_groups for entry in trace.vision))
        for language in trace.language:
            result["llm_sequence"].append(int((language.positions[0] >= 0).sum()))
    else:
        groups, per_group = _unmerged_vision_groups(model, inputs)
        result.update(vit_per_group=[per_group], vit_groups=groups)
    return result


def _unmerged_vision_groups(model, inputs) -> tuple[int, int]:
    if model.config.model_type == "llava_onevision":
        vision = model.config.vision_config
        per_group = (vision.image_size // vision.patch_size) ** 2
        if "pixel_values_videos" in inputs:
            return int(inputs["pixel_values_videos"].shape[:2].numel()), per_group
        crops = sum(int(n) for n in _llava_crops(model, inputs))
        return crops, per_group
    grid = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))
    per_slice = grid[:, 1] * grid[:, 2]
    return int(grid[:, 0].sum()), int(per_slice.float().mean())


def _llava_crops(model, inputs) -> list[int]:
    from ..compat import image_size_to_num_patches

    return [
        image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
        for size in inputs["image_sizes"]
    ]


def _inputs_builder(model, processor, family: str, image_size: int, frames: int | None, device: str, dtype):
    rng = np.random.default_rng(0)
    if frames:
        video = rng.integers(0, 256, (frames, 384, 384, 3), dtype=np.uint8)
    else:
        from PIL import Image

        image = Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
    placeholder = {
        ("llava_onevision", False): "<image>", ("llava_onevision", True): "<video>",
        ("qwen2_vl", False): "<|vision_start|><|image_pad|><|vision_end|>",
        ("qwen2_vl", True): "<|vision_start|><|video_pad|><|vision_end|>",
        ("qwen3_vl", False): "<|vision_start|><|image_pad|><|vision_end|>",
        ("qwen3_5", False): "<|vision_start|><|image_pad|><|vision_end|>",
    }[(family, bool(frames))]

    def build(batch: int):
        text = [placeholder + "Describe this in detail."] * batch
        if frames:
            media = {"videos": [video] * batch}
        else:
            media = {"images": [[image]] * batch if family == "llava_onevision" else [image] * batch}
        inputs = processor(text=text, return_tensors="pt", padding=True, **media).to(device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(dtype)
        return inputs

    return build


def run_suite(model, processor, family, settings: dict, build_inputs, batches, repeats: int, new_tokens: int,
              device: str, label: str = "") -> list[dict]:
    """Rounds: within a round every setting runs once, in turn (interleaved), `repeats` rounds. Times shown: the
    fastest round's (other processes only ever add time). Ratios to the baseline (the first setting, same batch):
    the median over rounds of the ratio to the baseline run in the same round, seconds apart; on a shared machine
    whose speed drifts over minutes, a ratio of two fastest rounds taken at different times moved a 16% saving by
    a fifth, paired ratios cancel the drift. Peak memory: one more run of each setting, apart (its profiler slows
    the run on CPU). `label` is appended to every setting's name."""
    configs = {name: IllavaConfig(**options) if options else None for name, options in settings.items()}
    rows = []
    for batch in batches:
        for name, config in configs.items():  # warm-up
            measure_once(model, processor, family, build_inputs, config, batch, new_tokens, device)
        samples = {name: [] for name in configs}
        for _ in range(repeats):
            for name, config in configs.items():
                samples[name].append(measure_once(model, processor, family, build_inputs, config, batch,
                                                  new_tokens, device))
        peaks = {name: measure_once(model, processor, family, build_inputs, config, batch, new_tokens, device,
                                    memory=True).peak_bytes for name, config in configs.items()}
        base_name = next(iter(configs))
        base = None
        for name in configs:
            row = _fastest_row(name + label, samples[name])
            row["peak_bytes"] = peaks[name]
            base = base or row

            def per_round(seconds, name=name):
                """Baseline time / this setting's time, round by round."""
                return [seconds(b) / seconds(m) for b, m in zip(samples[base_name], samples[name])]

            prefill_ratios = per_round(lambda m: m.vision_s + m.prefill_s)
            row["ratio_prefill"] = statistics.median(prefill_ratios)
            row["ratio_end_to_end"] = statistics.median(per_round(lambda m: m.end_to_end_s))
            row["ratio_samples_per_s"] = row["ratio_end_to_end"]  # same batch
            row["stage_speedups"] = {"vision": statistics.median(per_round(lambda m: m.vision_s)),
                                     "llm": statistics.median(per_round(lambda m: m.prefill_s))}
            row["flops_predicted_speedup"] = base["flops"]["total"] / row["flops"]["total"]
            if row is base:
                row["fraction_of_flops_limit"], row["fraction_of_flops_limit_quartiles"] = 1.0, [1.0, 1.0]
            else:
                quartiles = statistics.quantiles(prefill_ratios, n=4) if len(prefill_ratios) > 1 else prefill_ratios * 3
                row["fraction_of_flops_limit"] = _fraction(row["ratio_prefill"], row)
                row["fraction_of_flops_limit_quartiles"] = [_fraction(quartiles[0], row), _fraction(quartiles[2], row)]
            row["ratio_peak_memory"] = row["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("nan")
            row["merge_share_of_prefill"] = row["merge_s"] / (row["vision_s"] + row["prefill_s"])
            row["rounds"] = [dataclasses.asdict(measurement) for measurement in samples[name]]
            row.update(stage_fractions(row, base))
            rows.append(row)
            logger.info("batch %d %s: %s", batch, name, {key: value for key, value in row.items() if key != "rounds"})
    return rows


def _fraction(speedup: float, row: dict) -> float:
    """A prefill speed-up as a fraction of the setting's FLOPs limit: (measured - 1) / (predicted - 1)."""
    return (speedup - 1) / max(row["flops_predicted_speedup"] - 1, 1e-9)


def stage_fractions(row: dict, base: dict) -> dict:
    """Each stage's speed-up (`row["stage_speedups"]`) as a fraction of its own FLOPs limit: vision encoder time
    against vision FLOPs, prefill after it against LLM FLOPs (None where the setting leaves a stage's FLOPs as they
    are). A setting that changes one stage by a few percent has a whole-prefill fraction at the mercy of the other
    stage's timing noise."""
    fractions = {}
    for stage, flops in (("vision", "vision"), ("llm", "llm_prefill")):
        limit = base["flops"][flops] / row["flops"][flops]
        speedup = row["stage_speedups"][stage]
        fractions[f"fraction_of_{stage}_limit"] = (speedup - 1) / (limit - 1) if limit > 1.001 else None
    return fractions


def _fastest_row(name: str, measurements: list[Measurement]) -> dict:
    first = measurements[0]
    row = {"setting": name, "batch": first.batch, "visual_tokens": first.visual_tokens, "flops": first.flops}
    for field in ("vision_s", "prefill_s", "end_to_end_s", "merge_s"):
        row[field] = min(getattr(m, field) for m in measurements)
    row["decode_tokens_per_s"] = max(m.decode_tokens_per_s for m in measurements)
    row["samples_per_s"] = row["batch"] / row["end_to_end_s"]
    return row


def video_sweep(model, processor, frame_counts, budget_bytes: int | None, repeats: int, device: str, dtype,
                batches=(1,)) -> tuple[list[dict], dict[str, int | None]]:
    """Prefill time and peak memory per frame count (and batch), baseline vs the paper's video setting, and per
    setting the largest frame count whose peak stayed within `budget_bytes` (at batch 1)."""
    rows = []
    for frames in frame_counts:
        build = _inputs_builder(model, processor, "llava_onevision", 0, frames, device, dtype)
        try:
            swept = run_suite(model, processor, "llava_onevision", VIDEO_SETTINGS, build, batches, repeats, 2, device)
        except torch.cuda.OutOfMemoryError if on_cuda(device) else MemoryError:
            logger.warning("out of memory at %d frames", frames)
            break
        for row in swept:
            row["frames"] = frames
        rows += swept
    largest = {}
    if budget_bytes is not None:
        for name in VIDEO_SETTINGS:
            fitting = [row["frames"] for row in rows
                       if row["setting"] == name and row["batch"] == 1 and row["peak_bytes"] <= budget_bytes]
            largest[name] = max(fitting) if fitting else None
            logger.info("%s: largest frame count within budget: %s", name, largest[name])
    return rows, largest


def _percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{fraction:.0%}"


def _with_quartiles(row: dict) -> str:
    """The fraction of the limit, and the middle half of the rounds' fractions where rounds disagree."""
    low, high = row.get("fraction_of_flops_limit_quartiles", [None, None])
    if low is None or round(low, 2) == round(high, 2):
        return _percent(row["fraction_of_flops_limit"])
    return f"{_percent(row['fraction_of_flops_limit'])} ({low * 100:.0f}–{high * 100:.0f})"


def compile_in_place(model) -> None:
    """`torch.compile` (inductor, dynamic shapes) of the vision encoder and the language model, as users compile
    for speed; illava's merge layers and hooks run eagerly between the compiled graphs (`illava.state.eager`)."""
    find_family(model).vision_tower(model).compile(dynamic=True)
    model.model.language_model.compile(dynamic=True)


def markdown_table(rows: list[dict]) -> str:
    header = ("| setting | batch | visual tokens (LLM in) | LLM seq after merge | GFLOPs | vision ms | prefill ms | "
              "prefill speed-up | FLOPs limit | of limit (rounds' middle half) | of limit: vision / LLM | decode tok/s | samples/s | "
              "samples/s ratio | merge share | peak MiB | mem ratio |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        tokens = row["visual_tokens"]
        lines.append(
            f"| {row['setting']}{' @' + str(row['frames']) + 'f' if 'frames' in row else ''} | {row['batch']} | "
            f"{tokens['llm_visual_input']} | {tokens['llm_sequence'][-1]} | {row['flops']['total'] / 1e9:.1f} | "
            f"{row['vision_s'] * 1e3:.0f} | {row['prefill_s'] * 1e3:.0f} | {row['ratio_prefill']:.2f}x | "
            f"{row['flops_predicted_speedup']:.2f}x | {_with_quartiles(row)} | "
            f"{_percent(row.get('fraction_of_vision_limit'))} / {_percent(row.get('fraction_of_llm_limit'))} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['samples_per_s']:.2f} | {row['ratio_samples_per_s']:.2f}x | "
            f"{row['merge_share_of_prefill']:.1%} | "
            f"{row['peak_bytes'] / 2**20:.0f} | {row['ratio_peak_memory']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], video_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if video_rows else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    merged = [row for row in rows if row["setting"] != "baseline"]
    axis = axes[0, 0]
    for row in merged:
        axis.scatter(row["flops_predicted_speedup"], row["ratio_prefill"], label=f"{row['setting']} (b{row['batch']})")
    limit = max([row["flops_predicted_speedup"] for row in merged] + [1.0]) * 1.1
    axis.plot([1, limit], [1, limit], "k--", linewidth=0.8, label="time follows FLOPs")
    axis.set(xlabel="FLOPs-predicted prefill speed-up", ylabel="measured prefill speed-up", title="speed-up vs limit")
    axis.legend(fontsize=7)
    if video_rows:
        axis = axes[0, 1]
        for name in VIDEO_SETTINGS:
            points = [(row["frames"], row["peak_bytes"] / 2**20) for row in video_rows if row["setting"] == name]
            axis.plot(*zip(*points), marker="o", label=name)
        axis.set(xlabel="frames", ylabel="peak memory (MiB)", title="memory vs frames")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated integers of at least 1, e.g. 1,4,8."""
    try:
        return [positive_int(item) for item in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="llava-ov-7b-cpu", choices=sorted(GEOMETRIES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--attn", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    parser.add_argument("--image-size", type=positive_int, default=768)
    parser.add_argument("--batches", type=positive_ints, default=[1], help="comma-separated batch sizes, e.g. 1,4,8")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--new-tokens", type=positive_int, default=8)
    parser.add_argument("--video-frames", type=positive_ints, default=[],
                        help="comma-separated frame counts for the video sweep")
    parser.add_argument("--video-batches", type=positive_ints, default=None,
                        help="comma-separated batch sizes for the video sweep (default: --batches)")
    parser.add_argument("--memory-budget-gib", type=positive_float, default=None,
                        help="report the largest frame count of the video sweep that fits")
    parser.add_argument("--compile", action="store_true",
                        help="after the eager runs, torch.compile the vision encoder and the language model "
                             "(inductor, dynamic shapes) and run the image settings again")
    parser.add_argument("--output_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    # everything that can be checked is, before minutes of building a model
    family = GEOMETRIES[args.geometry][0]
    if args.video_frames and family != "llava_onevision":
        parser.error(f"--video-frames: the video sweep uses a LLaVA-OneVision geometry, not {args.geometry!r}")
    if args.video_batches and not args.video_frames:
        parser.error("--video-batches applies to the video sweep: give --video-frames too")
    if args.memory_budget_gib is not None and not args.video_frames:
        parser.error("--memory-budget-gib applies to the video sweep: give --video-frames too")
    try:
        check_device_and_attention(args.device, args.attn, args.dtype)
    except CliError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    model, processor, family = build_model(args.geometry, args.device, dtype, args.attn)
    build_inputs = _inputs_builder(model, processor, family, args.image_size, None, args.device, dtype)
    rows = run_suite(model, processor, family, SETTINGS[family], build_inputs, args.batches, args.repeats,
                     args.new_tokens, args.device)
    video_rows, largest = [], {}
    if args.video_frames:
        budget = int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else None
        video_rows, largest = video_sweep(model, processor, args.video_frames, budget, args.repeats, args.device,
                                          dtype, args.video_batches or args.batches)
    if args.compile:
        compile_in_place(model)
        rows += run_suite(model, processor, family, SETTINGS[family], build_inputs, args.batches, args.repeats,
                          args.new_tokens, args.device, label=" (compiled)")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{args.geometry}-{args.device}-{args.dtype}-{args.attn}{'-compiled' if args.compile else ''}"
    machine = {"device": torch.cuda.get_device_name(args.device) if on_cuda(args.device) else "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    (output / f"{stem}.json").write_text(json.dumps(
        {"arguments": vars(args), "machine": machine, "rows": rows, "video": video_rows,
         "largest_frames_within_budget": largest}, indent=1, default=str))
    table = markdown_table(rows + video_rows)
    (output / f"{stem}.md").write_text(table + "\n")
    plot(rows, video_rows, output / f"{stem}.png")
    sys.stdout.write(table + "\n")


if __name__ == "__main__":
    main()
