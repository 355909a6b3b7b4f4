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

`--modes` runs vit / llm / both once per merge mode (`merge`, the paper's and the default, `drop`, `shift`,
`pivot`: `illava_vit_mode` / `illava_llm_mode`); a mode other than `merge` shows as e.g. `vit:pivot`.

random and pool reduce the projected features of each crop and lay the s x s grids out as LLaVA-OneVision does
(base crop, then the high-resolution grid with a newline per row) - the layout iLLaVA's ViT stage produces for a
square count - so every method hands the LLM the same number of tokens in the same arrangement.

    python benchmarks/accuracy_retention.py                     # 200 held-out scenes, all methods and budgets
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

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `training.scenes` lives in the checkout, next to the package

import illava  # noqa: E402
from illava import merge  # noqa: E402
from illava.default_model import DEFAULT_MODEL_PATH, build_prompt, decode_answer, load_default_model  # noqa: E402
from training.scenes import Sample, sample  # noqa: E402

METHODS = ("vit", "llm", "both", "random", "pool", "fastv", "visionzip")
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


def describe(method: str, options: dict, side: int) -> str:
    parts = []
    if options.get("enable_illava_vit"):
        parts.append(f"vit k={options['illava_vit_k']} r={options['illava_vit_r']}")
    if options.get("enable_illava_llm"):
        parts.append(f"llm k={options['illava_llm_k']} keep={options['illava_llm_r']:.3f}")
    mode = options.get("illava_vit_mode", options.get("illava_llm_mode", "merge"))
    if mode != "merge":
        parts.append(f"mode {mode}")
    if method == "random":
        parts.append(f"random {side}x{side}/crop")
    if method == "pool":
        parts.append(f"avg-pool {side}x{side}/crop")
    if method == "visionzip":
        dominant, contextual = visionzip_split(side * side)
        parts.append(f"{dominant} dominant + {contextual} contextual per crop")
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


# -- evaluation -------------------------------------------------------------------------------------------


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="held-out scenes (test split, from index 0)")
    parser.add_argument("--sides", type=int, nargs="+", default=[13, 11, 10, 8, 7, 5, 4],
                        help="per-crop grid sides to test (each must be reachable by the ViT stage)")
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
    reachable = valid_sides(full_side, len(vit_k))
    unreachable = [side for side in args.sides if side not in reachable or side >= full_side]
    if unreachable:
        raise SystemExit(f"sides {unreachable} are not reachable with {len(vit_k)} ViT merge layers; use {reachable[1:]}")
    items = [sample("test", index) for index in range(args.samples)]
    blank = [dataclasses.replace(item, image=item.image.point(lambda _: 128)) for item in items]

    rows = []

    def record(method: str, side: int, setting: str, measure: Callable[[], tuple[float, float]]) -> None:
        start = time.perf_counter()
        accuracy, visual = measure()
        rows.append(dict(method=method, side=side, setting=setting, accuracy=accuracy, visual_tokens=visual,
                         seconds=time.perf_counter() - start))
        print(f"{method:8s} side {side:2d}  {setting:45s} visual {visual:6.1f}  accuracy {accuracy:.3f}  "
              f"[{rows[-1]['seconds']:.0f} s]", flush=True)

    record("full", full_side, "no reduction", lambda: run(model, processor, items, args.batch_size))
    record("blank", full_side, "grey image (text-only floor)", lambda: run(model, processor, blank, args.batch_size))
    methods = [f"{method}:{mode}" if mode != "merge" else method
               for method in args.methods for mode in (args.modes if method in ILLAVA_METHODS else ["merge"])]
    for method in methods:
        for side in args.sides:
            options = settings_for(method, side, full_side, vit_k, llm_k)
            setting = describe(method, options, side)
            if options:
                with illava.applied(model, options, processor=processor):
                    record(method, side, setting, lambda: run(model, processor, items, args.batch_size))
            else:
                tokens = side * side
                if method == "visionzip":
                    reducing = visionzip_crops(model, processor, tokens)
                elif method == "random":
                    generator = torch.Generator().manual_seed(args.seed)
                    reducing = reduced_crops(model, processor, tokens,
                                             lambda features: random_keep(features, tokens, generator))
                else:
                    reducing = reduced_crops(model, processor, tokens, lambda features: average_pool(features, tokens))
                with reducing:
                    record(method, side, setting, lambda: run(model, processor, items, args.batch_size))

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, args.samples, command)
    (args.out / "accuracy_retention.md").write_text(table)
    (args.out / "accuracy_retention.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    plot(rows, args.out / "accuracy_retention.png", args.samples, vit_k, llm_k)
    print()
    print(table)
    print(f"wrote {args.out / 'accuracy_retention.md'}, .json and .png")


def markdown_table(rows: list[dict], samples: int, command: str) -> str:
    """Accuracy per method (columns) and budget (rows); the budget is the visual tokens the LLM receives."""
    full = next(row for row in rows if row["method"] == "full")
    blank = next(row for row in rows if row["method"] == "blank")
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] not in ("full", "blank")))
    sides = sorted({row["side"] for row in rows if row["method"] in methods}, reverse=True)
    lines = [
        f"Accuracy (exact match, greedy) on {samples} held-out scenes; full model {full['accuracy']:.3f} with "
        f"{llm_tokens(full['side'])} visual tokens, grey image (text only) {blank['accuracy']:.3f}.",
        "",
        "| tokens/crop | LLM visual tokens | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for side in sides:
        cells = []
        for method in methods:
            match = [row for row in rows if row["method"] == method and row["side"] == side]
            cells.append(f"{match[0]['accuracy']:.3f}" if match else "")
        lines.append(f"| {side}x{side} = {side * side} | {llm_tokens(side)} ({llm_tokens(side) / llm_tokens(full['side']):.0%}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "Settings:", ""]
    lines += [f"- {row['method']} {row['side']}x{row['side']}: {row['setting']}" for row in rows
              if row["method"] in methods]
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, samples: int, vit_k: tuple[int, ...], llm_k: tuple[int, ...]) -> None:
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
        points = sorted((llm_tokens(row["side"]), row["accuracy"]) for row in rows if row["method"] == method)
        if points:
            points.append((llm_tokens(full["side"]), full["accuracy"]))
            axes.plot(*zip(*points), marker="o", label=label)
    axes.axhline(blank["accuracy"], color="grey", linestyle=":", label="grey image (text only)")
    axes.set_xlabel("visual tokens the LLM works on (after the last merge)")
    axes.set_ylabel("held-out accuracy")
    axes.set_title(f"Tiny LLaVA-OneVision on generated scenes, {samples} held-out questions")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
