"""Accuracy vs visual-token budget on held-out generated scenes, with the trained default model.

Each image is a 224x224 scene; LLaVA-OneVision turns it into a base crop and one high-resolution crop of
14x14 = 196 tokens each, plus a newline token per row of the high-resolution grid: 406 visual tokens. A budget is
a side s of a square per-crop grid (s*s tokens per crop, 2*s*s + s visual tokens for the LLM), reached by:

- vit:    iLLaVA in the vision tower, layers --vit-k, r = (196 - s*s) / len(k) tokens merged per layer and crop
- llm:    iLLaVA in the decoder at layer --llm-k, keeping 2*s*s + s of the 406 visual tokens; the layers before
          it still see all 406
- both:   the ViT stage to the side whose count is nearest the geometric mean of the target and 406, the LLM
          stage for the rest (ViT stage off when that side is the full 14)
- random: the same s*s tokens per crop kept at random (seeded), in raster order
- pool:   each crop's 14x14 grid average-pooled to s x s
- fastv:  FastV-style (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764): the
          visual tokens pruned at decoder layer 2, nothing merged (iLLaVA's LLM stage in mode "drop" at k=2, so
          ranked by the last prompt token's attention in layer 1; FastV itself averages over all queries)
- visionzip: VisionZip-style (Yang et al. 2024, "VisionZip: Longer is Better but Not Necessary in Vision Language
          Models", arXiv 2412.04467) per crop, from the last vision layer: the dominant tokens by attention
          received (54/64 of the budget, in raster order), then contextual tokens: the rest split into groups
          around evenly spaced centres by key similarity, each group averaged

Videos (`--media video`): 8 frames of a held-out video (`training.scenes.sample_video`: one coloured shape moving
among still decoys; questions on its direction, colour and shape); LLaVA-OneVision pools each frame's 14x14 tower
tokens 2x2 to 7x7 = 49 and puts one newline after the video: 8 * 49 + 1 = 393 visual tokens. A budget is t tokens
per frame (8t + 1 for the LLM): the ViT stage keeps 4t survivors per frame in the tower (pooled to t), the LLM
stages and FastV keep 8t + 1 of the 393, and the peers reduce each frame's pooled 7x7 grid to t (VisionZip ranks
and groups by the last vision layer's attention received and keys, pooled 2x2 as the features are).

`--modes` runs vit / llm / both once per merge mode (`merge`, the paper's and the default, `drop`, `shift`,
`pivot`: `illava_vit_mode` / `illava_llm_mode`); a mode other than `merge` shows as e.g. `vit:pivot`.

random and pool reduce the projected features of each crop and lay the s x s grids out as LLaVA-OneVision does
(base crop, then the high-resolution grid with a newline per row) - the layout iLLaVA's ViT stage produces for a
square count - so every method hands the LLM the same number of tokens in the same arrangement.

    python benchmarks/accuracy_retention.py                     # 200 scenes and 120 videos, all methods and budgets
    python benchmarks/accuracy_retention.py --media video --videos 40 --frame-tokens 16 --methods vit visionzip
    python benchmarks/accuracy_retention.py --samples 40 --sides 10 7 --methods vit pool
    python benchmarks/accuracy_retention.py --methods vit llm --modes merge drop shift pivot
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shlex
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `training.scenes` lives in the checkout, next to the package

import illava  # noqa: E402
from illava import merge  # noqa: E402
from illava.tools.default_model import DEFAULT_MODEL_PATH, build_prompt, decode_answer, load_default_model  # noqa: E402
from training.scenes import Sample, VideoSample, sample, sample_video  # noqa: E402

METHODS = ("vit", "llm", "both", "random", "pool", "fastv", "visionzip")
FRAME_POOL = 2  # LLaVA-OneVision pools each video frame's token grid 2x2 after the projector
ILLAVA_METHODS = ("vit", "llm", "both")
RESULTS = ROOT / "benchmarks" / "results"


# -- budgets ----------------------------------------------------------------------------------------------


def llm_tokens(side: int) -> int:
    """Visual tokens the LLM receives for one scene when each crop holds side x side tokens."""
    return 2 * side * side + side


def valid_sides(full_side: int, vit_layers: int) -> list[int]:
    """Sides the ViT stage reaches with an integer r on `vit_layers` layers (largest first, full side included)."""
    full = full_side * full_side
    return [side for side in range(full_side, 0, -1) if (full - side * side) % vit_layers == 0]


def vit_options(side: int, full_side: int, layers: tuple[int, ...]) -> dict:
    removed = (full_side * full_side - side * side) // len(layers)
    return dict(enable_illava_vit=True, illava_vit_k="-".join(map(str, layers)), illava_vit_r=removed)


def llm_options(target: int, current: int, layers: tuple[int, ...]) -> dict:
    # a keep ratio whose floor lands exactly on the target count
    return dict(enable_illava_llm=True, illava_llm_k="-".join(map(str, layers)), illava_llm_r=(target + 0.5) / current)


def settings_for(method: str, side: int, full_side: int, vit_k: tuple[int, ...], llm_k: tuple[int, ...]) -> dict:
    """The illava options for `method` (`vit:pivot`: with that merge mode) at `side` (empty for the baselines)."""
    method, _, mode = method.partition(":")
    options = _stage_settings(method, side, full_side, vit_k, llm_k)
    if options and mode:
        options.update(illava_vit_mode=mode, illava_llm_mode=mode)
    return options


def _stage_settings(method: str, side: int, full_side: int, vit_k: tuple[int, ...], llm_k: tuple[int, ...]) -> dict:
    full = llm_tokens(full_side)
    if method == "vit":
        return vit_options(side, full_side, vit_k)
    if method == "llm":
        return llm_options(llm_tokens(side), full, llm_k)
    if method == "fastv":
        return dict(llm_options(llm_tokens(side), full, (2,)), illava_llm_mode="drop")
    if method == "both":
        middle = math.sqrt(llm_tokens(side) * full)
        candidates = [s for s in valid_sides(full_side, len(vit_k)) if s > side]
        vit_side = min(candidates, key=lambda s: abs(math.log(llm_tokens(s) / middle)))
        options = llm_options(llm_tokens(side), llm_tokens(vit_side), llm_k)
        if vit_side < full_side:
            options.update(vit_options(vit_side, full_side, vit_k))
        return options
    return {}


def frame_tower_tokens(frame_tokens: int) -> int:
    """Survivors a frame needs in the vision tower to reach the LLM as `frame_tokens` after the 2x2 pooling
    (a square grid pools bilinearly, any other count by averaging runs of four)."""
    return FRAME_POOL**2 * frame_tokens


def video_llm_tokens(frame_tokens: int, frames: int) -> int:
    """Visual tokens the LLM receives for one video: every frame's tokens and one newline after the video."""
    return frames * frame_tokens + 1


def valid_frame_tokens(full_side: int, vit_layers: int) -> list[int]:
    """Per-frame token counts the ViT stage reaches with an integer r on `vit_layers` layers (full count first)."""
    full = full_side * full_side
    pooled = math.ceil(full_side / FRAME_POOL) ** 2
    return [tokens for tokens in range(pooled, 0, -1)
            if tokens == pooled or (full - frame_tower_tokens(tokens)) % vit_layers == 0]


def video_settings_for(method: str, frame_tokens: int, frames: int, full_side: int, vit_k: tuple[int, ...],
                       llm_k: tuple[int, ...]) -> dict:
    """`settings_for` for videos of `frames` frames at `frame_tokens` tokens per frame in the LLM."""
    method, _, mode = method.partition(":")
    full_frame = math.ceil(full_side / FRAME_POOL) ** 2
    full = video_llm_tokens(full_frame, frames)
    target = video_llm_tokens(frame_tokens, frames)

    def vit(tokens: int) -> dict:
        removed = (full_side * full_side - frame_tower_tokens(tokens)) // len(vit_k)
        return dict(enable_illava_vit=True, illava_vit_k="-".join(map(str, vit_k)), illava_vit_r=removed)

    if method == "vit":
        options = vit(frame_tokens)
    elif method == "llm":
        options = llm_options(target, full, llm_k)
    elif method == "fastv":
        options = dict(llm_options(target, full, (2,)), illava_llm_mode="drop")
    elif method == "both":
        middle = math.sqrt(target * full)
        candidates = [t for t in valid_frame_tokens(full_side, len(vit_k)) if t > frame_tokens]
        vit_tokens = min(candidates, key=lambda t: abs(math.log(video_llm_tokens(t, frames) / middle)))
        options = llm_options(target, video_llm_tokens(vit_tokens, frames), llm_k)
        if vit_tokens < full_frame:
            options.update(vit(vit_tokens))
    else:
        return {}
    if mode:
        options.update(illava_vit_mode=mode, illava_llm_mode=mode)
    return options


def describe(method: str, options: dict, tokens: int, unit: str = "crop") -> str:
    """The setting of `method` in words; `tokens` per `unit` (an image crop or a video frame) for the peers."""
    parts = []
    if options.get("enable_illava_vit"):
        parts.append(f"vit k={options['illava_vit_k']} r={options['illava_vit_r']}")
    if options.get("enable_illava_llm"):
        parts.append(f"llm k={options['illava_llm_k']} keep={options['illava_llm_r']:.3f}")
    mode = options.get("illava_vit_mode", options.get("illava_llm_mode", "merge"))
    if mode != "merge":
        parts.append(f"mode {mode}")
    side = math.isqrt(tokens)
    if method == "random":
        parts.append(f"random {tokens}/{unit}")
    if method == "pool":
        parts.append(f"avg-pool {side}x{side}/{unit}")
    if method == "visionzip":
        dominant, contextual = visionzip_split(tokens)
        parts.append(f"{dominant} dominant + {contextual} contextual per {unit}")
    return ", ".join(parts)


# -- baselines: reduce each crop's projected features, then lay them out as LLaVA-OneVision does ------------


def random_keep(features: torch.Tensor, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """`[crops, n, D] -> [crops, tokens, D]`: a random subset per crop, kept in raster order."""
    scores = torch.rand(features.shape[:2], generator=generator).to(features.device)
    keep = scores.topk(tokens, dim=1).indices.sort(dim=1).values
    return features.gather(1, keep[..., None].expand(-1, -1, features.shape[-1]))


def average_pool(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """`[crops, side*side, D] -> [crops, tokens, D]`: adaptive average pooling of each crop's token grid."""
    crops, count, dim = features.shape
    side, target = math.isqrt(count), math.isqrt(tokens)
    grid = features.transpose(1, 2).reshape(crops, dim, side, side)
    return nn.functional.adaptive_avg_pool2d(grid, target).flatten(2).transpose(1, 2)


def anyres_layout(inner, features: torch.Tensor, image_size, image_newline: torch.Tensor) -> torch.Tensor:
    """One image's crops `[crops, s*s, D]` as the LLM sees them: base crop, then the stitched high-resolution
    grid, unpadded to the image's aspect ratio, with a newline token after each row.

    The scenes' single pinpoint never triggers LLaVA-OneVision's `anyres_max_9` downscaling, which is left out.
    """
    from illava.compat import get_anyres_image_grid_shape, unpad_image

    side = math.isqrt(features.shape[1])
    rows, cols = get_anyres_image_grid_shape(
        image_size, inner.config.image_grid_pinpoints, inner.config.vision_config.image_size
    )
    grid = features[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    grid = unpad_image(grid, image_size)
    newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)
    grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((features[0], grid), dim=0)


def visionzip_split(tokens: int) -> tuple[int, int]:
    """VisionZip's default proportion, 54 dominant + 10 contextual of 64, at any budget (at least one of each
    when the budget allows)."""
    dominant = min(tokens - 1, max(1, round(tokens * 54 / 64))) if tokens > 1 else tokens
    return dominant, tokens - dominant


def visionzip_select(features: torch.Tensor, received: torch.Tensor, keys: torch.Tensor, tokens: int) -> torch.Tensor:
    """`features [crops, n, D]` -> `[crops, tokens, D]`: dominant tokens by attention `received [crops, n]`, then
    contextual tokens: the others grouped around evenly spaced centres by cosine similarity of `keys [crops, n, d]`."""
    dominant, contextual = visionzip_split(tokens)
    crops, count, dim = features.shape
    top = received.topk(dominant, dim=1).indices.sort(dim=1).values
    picked = features.gather(1, top[..., None].expand(-1, -1, dim))
    if contextual == 0:
        return picked
    rest = torch.ones(crops, count, dtype=torch.bool, device=features.device)
    rest.scatter_(1, top, False)
    rest_index = rest.nonzero()[:, 1].view(crops, count - dominant)
    rest_features = features.gather(1, rest_index[..., None].expand(-1, -1, dim))
    rest_keys = nn.functional.normalize(keys.gather(1, rest_index[..., None].expand(-1, -1, keys.shape[-1])), dim=-1)
    centres = torch.linspace(0, count - dominant - 1, contextual, device=features.device).round().long()
    similarity = rest_keys @ rest_keys[:, centres].transpose(1, 2)  # [crops, rest, contextual]
    group = similarity.argmax(dim=-1)
    group[:, centres] = torch.arange(contextual, device=features.device)  # each centre in its own group
    sums = torch.zeros(crops, contextual, dim, device=features.device, dtype=torch.float32)
    sums.scatter_add_(1, group[..., None].expand(-1, -1, dim), rest_features.float())
    sizes = torch.zeros(crops, contextual, device=features.device).scatter_add_(1, group, torch.ones_like(group, dtype=torch.float32))
    return torch.cat((picked, (sums / sizes[..., None]).to(features.dtype)), dim=1)


@contextlib.contextmanager
def visionzip_crops(model, processor, tokens: int) -> Iterator[None]:
    """`reduced_crops` with VisionZip's selection, scored in the vision tower's last layer (the features it outputs)."""
    attention = model.model.vision_tower.encoder.layers[-1].self_attn
    captured: dict[str, torch.Tensor] = {}
    handles = [attention.q_proj.register_forward_hook(lambda module, args, out: captured.update(q=out)),
               attention.k_proj.register_forward_hook(lambda module, args, out: captured.update(k=out))]
    heads = attention.num_heads

    def reduce(features: torch.Tensor) -> torch.Tensor:
        crops = features.shape[0]
        # the tower encodes all crops of the batch at once; this image's crops are the first `crops` not yet used
        query, key = (captured[name][:crops] for name in ("q", "k"))
        captured.update(q=captured["q"][crops:], k=captured["k"][crops:])
        query = query.view(crops, -1, heads, query.shape[-1] // heads).transpose(1, 2)
        key_heads = key.view(crops, -1, heads, key.shape[-1] // heads).transpose(1, 2)
        received = merge.attention_received(query, key_heads, attention.scale)
        return visionzip_select(features, received, key_heads.mean(dim=1), tokens)

    try:
        with reduced_crops(model, processor, tokens, reduce):
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def reduced_crops(model, processor, tokens: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, each crop reaches the LLM as `tokens` reduced features and prompts carry as many
    placeholders; both patches live on these instances and are removed on exit."""
    inner = model.model

    def pack_image_features(self, image_features, image_sizes, image_newline=None, vision_aspect_ratio=None):
        packed = [anyres_layout(self, reduce(feature), size, image_newline)
                  for feature, size in zip(image_features, image_sizes)]
        lengths = torch.tensor([feature.shape[0] for feature in packed], device=packed[0].device)
        return packed, lengths

    inner.pack_image_features = types.MethodType(pack_image_features, inner)
    full_tokens = processor.num_image_tokens
    processor.num_image_tokens = tokens  # the processor's anyres arithmetic on a sqrt(tokens) grid
    try:
        yield
    finally:
        del inner.pack_image_features
        processor.num_image_tokens = full_tokens


@contextlib.contextmanager
def reduced_frames(model, processor, tokens: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, each video frame reaches the LLM as `tokens` features reduced from its pooled grid
    (`reduce`: `[frames, pooled, D] -> [frames, tokens, D]`), and prompts carry as many placeholders."""
    inner = model.model
    pool = inner.apply_pooling

    def apply_pooling(self, features):
        return reduce(pool(features))

    def replace_video_token(self, video_inputs, video_idx, **kwargs):
        video = video_inputs["pixel_values_videos"][video_idx]
        frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
        return self.video_token * video_llm_tokens(tokens, frames)

    inner.apply_pooling = types.MethodType(apply_pooling, inner)
    processor.replace_video_token = types.MethodType(replace_video_token, processor)
    try:
        yield
    finally:
        del inner.apply_pooling
        del processor.replace_video_token


@contextlib.contextmanager
def visionzip_frames(model, processor, tokens: int) -> Iterator[None]:
    """`reduced_frames` with VisionZip's selection per frame: attention received in the vision tower's last layer
    and its keys, pooled 2x2 as the features are, rank and group each frame's pooled tokens."""
    attention = model.model.vision_tower.encoder.layers[-1].self_attn
    captured: dict[str, torch.Tensor] = {}
    handles = [attention.q_proj.register_forward_hook(lambda module, args, out: captured.update(q=out)),
               attention.k_proj.register_forward_hook(lambda module, args, out: captured.update(k=out))]
    heads = attention.num_heads

    def pooled(values: torch.Tensor) -> torch.Tensor:  # [frames, n, C] -> [frames, pooled n, C], as apply_pooling
        frames, count, channels = values.shape
        side = math.isqrt(count)
        grid = values.transpose(1, 2).reshape(frames, channels, side, side)
        size = [math.ceil(side / FRAME_POOL)] * 2
        return nn.functional.interpolate(grid, size=size, mode="bilinear").flatten(2).transpose(1, 2)

    def reduce(features: torch.Tensor) -> torch.Tensor:
        frames = features.shape[0]
        query, key = captured["q"], captured["k"]
        query = query.view(frames, -1, heads, query.shape[-1] // heads).transpose(1, 2)
        key_heads = key.view(frames, -1, heads, key.shape[-1] // heads).transpose(1, 2)
        received = merge.attention_received(query, key_heads, attention.scale)
        return visionzip_select(features, pooled(received[..., None])[..., 0], pooled(key_heads.mean(dim=1)), tokens)

    try:
        with reduced_frames(model, processor, tokens, reduce):
            yield
    finally:
        for handle in handles:
            handle.remove()


# -- evaluation -------------------------------------------------------------------------------------------


def video_prompt(processor, question: str) -> str:
    """The prompt for one video and one question: a user turn, then the assistant's start (as for images)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def run_videos(model, processor, items: list[VideoSample], batch_size: int) -> tuple[float, float]:
    """`run` for videos: exact-match accuracy and the mean visual tokens the LLM's last layers saw per video."""
    hits, visual = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        texts = [video_prompt(processor, item.question) for item in batch]
        videos = [np.stack([np.asarray(frame) for frame in item.frames]) for item in batch]
        inputs = processor(videos=videos, text=texts, return_tensors="pt", padding=True)
        generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        hits += [answer == item.answer for answer, item in zip(decode_answer(processor, generated, inputs), batch)]
        counts = (inputs["input_ids"] == model.config.video_token_id).sum(dim=1).tolist()
        if illava.is_applied(model) and illava.last_trace(model).language:
            counts = illava.last_trace(model).language[-1].visual_tokens_per_span
        visual += counts
    return sum(hits) / len(hits), sum(visual) / len(visual)



@torch.no_grad()
def run(model, processor, items: list[Sample], batch_size: int) -> tuple[float, float]:
    """Exact-match accuracy of greedy answers, and the mean visual tokens the LLM's last layers saw per scene."""
    hits, visual = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        texts = [build_prompt(processor, item.question) for item in batch]
        inputs = processor(images=[item.image for item in batch], text=texts, return_tensors="pt", padding=True)
        generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        hits += [answer == item.answer for answer, item in zip(decode_answer(processor, generated, inputs), batch)]
        counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
        if illava.is_applied(model) and illava.last_trace(model).language:
            counts = illava.last_trace(model).language[-1].visual_tokens_per_span
        visual += counts
    return sum(hits) / len(hits), sum(visual) / len(visual)


@dataclasses.dataclass
class Media:
    """One benchmark: images (budgets are per-crop grid sides) or videos (budgets are tokens per frame)."""

    name: str
    items: list
    blank: list
    budgets: list[int]
    full_budget: int
    llm_tokens: Callable[[int], int]  # budget -> visual tokens the LLM receives per item
    settings: Callable[[str, int], dict]  # (method, budget) -> illava options ({} for a peer)
    reduction: Callable[[str, int], contextlib.AbstractContextManager]  # (peer, budget) -> its patch
    run: Callable[[list], tuple[float, float]]
    unit: str  # what a budget counts, for the table

    def unit_tokens(self, budget: int) -> tuple[int, str]:
        """Tokens per crop or frame at `budget`, and which."""
        return (budget * budget, "crop") if self.name == "image" else (budget, "frame")

    def budget_label(self, budget: int) -> str:
        return f"{budget}x{budget} = {budget * budget}" if self.name == "image" else str(budget)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--media", nargs="+", choices=("image", "video"), default=["image", "video"])
    parser.add_argument("--samples", type=int, default=200, help="held-out scenes (test split, from index 0)")
    parser.add_argument("--sides", type=int, nargs="+", default=[13, 11, 10, 8, 7, 5, 4],
                        help="per-crop grid sides to test (each must be reachable by the ViT stage)")
    parser.add_argument("--videos", type=int, default=120, help="held-out videos (test split, from index 0)")
    parser.add_argument("--frames", type=int, default=8, help="frames per video")
    parser.add_argument("--frame-tokens", type=int, nargs="+", default=[25, 16, 4],
                        help="video budgets: tokens per frame the LLM receives (of 49; each reachable by the ViT stage)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--modes", nargs="+", choices=illava.config.MODE_NAMES, default=["merge"],
                        help="merge modes for the iLLaVA methods (vit, llm, both)")
    parser.add_argument("--vit-k", default="2-3-4")
    parser.add_argument("--llm-k", default="2")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="random dropping's generator seed")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="checkpoint (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = "python " + shlex.join([str(Path(sys.argv[0])), *(sys.argv[1:] if argv is None else argv)])

    torch.set_num_threads(args.threads)
    vit_k = illava.IllavaConfig(illava_vit_k=args.vit_k).illava_vit_k
    llm_k = illava.IllavaConfig(illava_llm_k=args.llm_k).illava_llm_k
    model, processor = load_default_model(path=args.model)
    full_side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    benchmarks = []
    if "image" in args.media:
        reachable = valid_sides(full_side, len(vit_k))
        unreachable = [side for side in args.sides if side not in reachable or side >= full_side]
        if unreachable:
            raise SystemExit(f"sides {unreachable} are not reachable with {len(vit_k)} ViT merge layers; use {reachable[1:]}")
        items = [sample("test", index) for index in range(args.samples)]
        benchmarks.append(Media(
            "image", items, [dataclasses.replace(item, image=item.image.point(lambda _: 128)) for item in items],
            args.sides, full_side, llm_tokens,
            lambda method, side: settings_for(method, side, full_side, vit_k, llm_k),
            lambda method, side: peer_reduction(model, processor, "image", method, side * side, args.seed),
            lambda batch: run(model, processor, batch, args.batch_size), "tokens/crop"))
    if "video" in args.media:
        reachable = valid_frame_tokens(full_side, len(vit_k))
        square = "pool" in args.methods  # pooling reaches square grids only
        reachable = [tokens for tokens in reachable if not square or math.isqrt(tokens) ** 2 == tokens]
        unreachable = [tokens for tokens in args.frame_tokens if tokens not in reachable[1:]]
        if unreachable:
            raise SystemExit(f"--frame-tokens {unreachable} are not reachable with {len(vit_k)} ViT merge layers"
                             f"{' and pooling' if square else ''}; use {reachable[1:]}")
        videos = [sample_video("test", index, args.frames) for index in range(args.videos)]
        grey = [dataclasses.replace(item, frames=[frame.point(lambda _: 128) for frame in item.frames]) for item in videos]
        benchmarks.append(Media(
            "video", videos, grey, args.frame_tokens, reachable[0],
            lambda tokens: video_llm_tokens(tokens, args.frames),
            lambda method, tokens: video_settings_for(method, tokens, args.frames, full_side, vit_k, llm_k),
            lambda method, tokens: peer_reduction(model, processor, "video", method, tokens, args.seed),
            lambda batch: run_videos(model, processor, batch, args.batch_size), "tokens/frame"))

    methods = [f"{method}:{mode}" if mode != "merge" else method
               for method in args.methods for mode in (args.modes if method in ILLAVA_METHODS else ["merge"])]
    args.out.mkdir(parents=True, exist_ok=True)
    for media in benchmarks:
        rows = []

        def record(method: str, budget: int, setting: str, items: list) -> None:
            start = time.perf_counter()
            accuracy, visual = media.run(items)
            rows.append(dict(method=method, side=budget, setting=setting, accuracy=accuracy, visual_tokens=visual,
                             seconds=time.perf_counter() - start))
            print(f"{media.name} {method:8s} {media.unit} {budget:2d}  {setting:45s} visual {visual:6.1f}  "
                  f"accuracy {accuracy:.3f}  [{rows[-1]['seconds']:.0f} s]", flush=True)

        record("full", media.full_budget, "no reduction", media.items)
        record("blank", media.full_budget, f"grey {media.name} (text-only floor)", media.blank)
        for method in methods:
            for budget in media.budgets:
                options = media.settings(method, budget)
                setting = describe(method, options, *media.unit_tokens(budget))
                if options:
                    with illava.applied(model, options, processor=processor):
                        record(method, budget, setting, media.items)
                else:
                    with media.reduction(method, budget):
                        record(method, budget, setting, media.items)
        stem = "accuracy_retention" if media.name == "image" else "accuracy_retention_video"
        table = markdown_table(rows, media, command)
        (args.out / f"{stem}.md").write_text(table)
        (args.out / f"{stem}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
        plot(rows, media, args.out / f"{stem}.png", vit_k, llm_k)
        print()
        print(table)
        print(f"wrote {args.out / stem}.md, .json and .png")


def peer_reduction(model, processor, media: str, method: str, tokens: int, seed: int) -> contextlib.AbstractContextManager:
    """The peer `method`'s patch, reducing each image crop (`media` "image") or each video frame's pooled grid
    ("video") to `tokens`."""
    if method == "visionzip":
        return (visionzip_crops if media == "image" else visionzip_frames)(model, processor, tokens)
    reduced = reduced_crops if media == "image" else reduced_frames
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return reduced(model, processor, tokens, lambda features: random_keep(features, tokens, generator))
    return reduced(model, processor, tokens, lambda features: average_pool(features, tokens))


def markdown_table(rows: list[dict], media: Media, command: str) -> str:
    """Accuracy per method (columns) and budget (rows); the budget is the visual tokens the LLM receives."""
    full = next(row for row in rows if row["method"] == "full")
    blank = next(row for row in rows if row["method"] == "blank")
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] not in ("full", "blank")))
    budgets = sorted({row["side"] for row in rows if row["method"] in methods}, reverse=True)
    full_tokens = media.llm_tokens(full["side"])
    lines = [
        f"Accuracy (exact match, greedy) on {len(media.items)} held-out {media.name}s; full model "
        f"{full['accuracy']:.3f} with {full_tokens} visual tokens, grey {media.name} (text only) {blank['accuracy']:.3f}.",
        "",
        f"| {media.unit} | LLM visual tokens | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for budget in budgets:
        cells = []
        for method in methods:
            match = [row for row in rows if row["method"] == method and row["side"] == budget]
            cells.append(f"{match[0]['accuracy']:.3f}" if match else "")
        tokens = media.llm_tokens(budget)
        lines.append(f"| {media.budget_label(budget)} | {tokens} ({tokens / full_tokens:.0%}) | " + " | ".join(cells) + " |")
    lines += ["", "Settings:", ""]
    lines += [f"- {row['method']} {media.budget_label(row['side'])}: {row['setting']}" for row in rows
              if row["method"] in methods]
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def plot(rows: list[dict], media: Media, path: Path, vit_k: tuple[int, ...], llm_k: tuple[int, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(row for row in rows if row["method"] == "full")
    blank = next(row for row in rows if row["method"] == "blank")
    labels = {
        "vit": f"iLLaVA ViT (k={'-'.join(map(str, vit_k))})",
        "llm": f"iLLaVA LLM (k={'-'.join(map(str, llm_k))})",
        "both": "iLLaVA ViT + LLM",
        "random": "random dropping",
        "pool": "uniform average pooling",
        "fastv": "FastV-style (drop at layer 2)",
        "visionzip": "VisionZip-style (dominant + contextual)",
    }
    figure, axes = plt.subplots(figsize=(7, 4.5))
    methods = dict.fromkeys(row["method"] for row in rows if row["method"] not in ("full", "blank"))
    for method in methods:
        stage, _, mode = method.partition(":")
        label = labels[stage] + (f", {mode}" if mode else "")
        points = sorted((media.llm_tokens(row["side"]), row["accuracy"]) for row in rows if row["method"] == method)
        if points:
            points.append((media.llm_tokens(full["side"]), full["accuracy"]))
            axes.plot(*zip(*points), marker="o", label=label)
    axes.axhline(blank["accuracy"], color="grey", linestyle=":", label=f"grey {media.name} (text only)")
    axes.set_xlabel("visual tokens the LLM works on (after the last merge)")
    axes.set_ylabel("held-out accuracy")
    axes.set_title(f"Tiny LLaVA-OneVision on generated scenes, {len(media.items)} held-out {media.name}s")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
