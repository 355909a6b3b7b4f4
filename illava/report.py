"""What the last forward merged, for people and logs: `merge_summary` (lines for a terminal) and `merge_reports`
(per-sample JSON data for harness logs): how many visual tokens each stage kept.

A report is plain JSON data:

    {"visual_tokens": {"vit_input": 80, "vit_layer_1": 65, "vit_layer_2": 50, "llm_input": 31, "llm_layer_2": 21},
     "items": [{"modality": "image", "groups": 5, "tokens_per_group": [16, 13, 10], "llm_tokens": 31}]}

`visual_tokens` lists the sample's totals in stage order: vision-encoder tokens before the first ViT merge layer
and after each one (counted in the encoder's merge units: patches for SigLIP, 2x2 windows for Qwen2-VL), the
image/video placeholders the language model receives, and the visual tokens left after each LLM merge layer.
`items` has one entry per image/video (groups = crops or frames). Without a ViT or LLM stage only `llm_input` is
known.
"""

from __future__ import annotations

from typing import Any

import torch

from .api import is_applied, last_trace
from .trace import IllavaTrace


def merge_summary(model) -> list[str]:
    """One line per vision-encoder call, per modality the LLM receives, and per LLM merge layer."""
    trace = last_trace(model)
    lines = []
    for entry in trace.vision:
        steps = " -> ".join(str(count) for count in entry.tokens_per_group)
        layers = "-".join(map(str, entry.merge_layers)) or "none"
        unit = "window" if entry.window > 1 else "crop/frame"
        lines.append(f"ViT {entry.modality}: {entry.num_groups} x {unit}, tokens {steps} (layers {layers})")
    for modality, counts in trace.tokens_per_item.items():
        if counts:
            lines.append(f"LLM receives {modality} tokens: {counts}")
    for language in trace.language:
        lines.append(f"LLM layer {language.layer}: visual tokens per image/video {language.visual_tokens_per_span}")
    return lines


def merge_reports(model, input_ids: torch.Tensor) -> list[dict[str, Any]]:
    """One report per row of `input_ids`, the prompts of the forward (or generate) that just ran on `model`."""
    ids = input_ids.detach().cpu()
    token_ids = {modality: getattr(model.config, f"{modality}_token_id", None) for modality in ("image", "video")}
    placeholders = {
        modality: (ids == token_id).sum(dim=1) if token_id is not None else torch.zeros(len(ids), dtype=torch.long)
        for modality, token_id in token_ids.items()
    }
    trace = last_trace(model) if is_applied(model) else None
    # The trace is only refreshed by forwards that encode images/videos: check that it describes these prompts.
    if trace is not None and any(
        sum(trace.tokens_per_item[modality]) != int(counts.sum()) for modality, counts in placeholders.items()
    ):
        trace = None
    reports = []
    for sample in range(len(ids)):
        llm_input = int(sum(counts[sample] for counts in placeholders.values()))
        if trace is None:
            reports.append({"visual_tokens": {"llm_input": llm_input}, "items": []})
            continue
        vit, items = _vision_stages(trace, sample)
        reports.append(
            {"visual_tokens": {**vit, "llm_input": llm_input, **_language_stages(trace, sample)}, "items": items}
        )
    return reports


def _item_samples(trace: IllavaTrace, modality: str) -> list[int]:
    starts = trace.item_starts.get(modality)
    return starts[:, 0].tolist() if starts is not None else []


def _vision_stages(trace: IllavaTrace, sample: int) -> tuple[dict[str, int], list[dict[str, Any]]]:
    totals: dict[str, int] = {}
    items = []
    offsets = {"image": 0, "video": 0}
    for entry in trace.vision:
        if entry.groups_per_item is None or entry.modality not in offsets:
            continue
        samples = _item_samples(trace, entry.modality)
        for local, groups in enumerate(entry.groups_per_item):
            index = offsets[entry.modality] + local
            if index >= len(samples) or samples[index] != sample:
                continue
            names = ["vit_input"] + [f"vit_layer_{layer}" for layer in entry.merge_layers]
            for name, tokens in zip(names, entry.tokens_per_group):
                totals[name] = totals.get(name, 0) + groups * tokens
            items.append(
                {
                    "modality": entry.modality,
                    "groups": groups,
                    "tokens_per_group": list(entry.tokens_per_group),
                    "llm_tokens": trace.tokens_per_item[entry.modality][index],
                }
            )
        offsets[entry.modality] += len(entry.groups_per_item)
    return totals, items


def _language_stages(trace: IllavaTrace, sample: int) -> dict[str, int]:
    # Span ids number the batch's images first, then its videos (patches.decoder.LanguageModelMerger._combine).
    span_samples = _item_samples(trace, "image") + _item_samples(trace, "video")
    spans = [span for span, owner in enumerate(span_samples) if owner == sample]
    return {
        f"llm_layer_{entry.layer}": sum(entry.visual_tokens_per_span[span] for span in spans)
        for entry in trace.language
    }
