"""Patches every supported model family needs around its encoders: trace bookkeeping, placeholder checks,
and handing each forward's image/video spans to the LLM stage.

The family's `get_image_features` / `get_video_features` / `get_placeholder_mask` keep the signatures of the VLMs
(LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) in every transformers release of the tested window (`illava.compat`); they are
wrapped on the instance.
"""

from __future__ import annotations

import torch

from ..state import IllavaState


class EncoderCall:
    """What the vision encoder is encoding right now: "image" or "video" inside `get_*_features`, else "vision"."""

    def __init__(self):
        self.modality = "vision"
        # the next encoder call starts a new trace once a forward has begun or ended (generate() encodes
        # images before its prefill forward, so both ends count)
        self.fresh_forward = True


def patch_encoding(state: IllavaState, model, inner, language_merger, call: EncoderCall) -> None:
    """Label encoder calls, record LLM tokens per image/video, check placeholders and hand spans to the LLM stage.

    Install the family's own `get_*_features` wrappers before this one, which must be outermost to see the
    features the language model will receive.
    """

    def mark_fresh_forward(module, *unused):
        call.fresh_forward = True

    def encode(modality, function, *args, **kwargs):
        with state.lock:  # also called on its own (generate() encodes before its prefill)
            if call.fresh_forward:
                state.trace.clear()
                call.fresh_forward = False
            call.modality = modality
            try:
                output = function(*args, **kwargs)
            finally:
                call.modality = "vision"
            state.trace.tokens_per_item[modality].extend(_tokens_per_item(output.pooler_output))
            return output

    def get_image_features(self, original, *args, **kwargs):
        return encode("image", original, *args, **kwargs)

    def get_video_features(self, original, *args, **kwargs):
        return encode("video", original, *args, **kwargs)

    def get_placeholder_mask(self, original, input_ids, inputs_embeds, image_features=None, video_features=None):
        _check_placeholder_counts(self.config, input_ids, image_features, video_features)
        image_mask, video_mask = original(
            input_ids, inputs_embeds, image_features=image_features, video_features=video_features
        )
        for features, mask, modality in ((image_features, image_mask, "image"), (video_features, video_mask, "video")):
            if features is None:
                continue
            span = span_ids(mask[..., 0], state.trace.tokens_per_item[modality])
            state.trace.item_starts[modality] = _item_starts(span)
            if language_merger is not None:
                language_merger.pending_spans.append(span)
        return image_mask, video_mask

    state.before_forward(model, mark_fresh_forward)
    state.after_forward(model, mark_fresh_forward, always_call=True)
    state.override_method(inner, "get_image_features", get_image_features)
    state.override_method(inner, "get_video_features", get_video_features)
    state.override_method(inner, "get_placeholder_mask", get_placeholder_mask)


def _tokens_per_item(pooler_output) -> list[int]:
    """LLM tokens per image/video: a tuple of per-item features, or one `[items, tokens, dim]` tensor."""
    if isinstance(pooler_output, torch.Tensor):
        return [int(pooler_output.shape[1])] * int(pooler_output.shape[0])
    return [int(features.shape[0]) for features in pooler_output]


def _check_placeholder_counts(model_config, input_ids, image_features, video_features) -> None:
    """Name the fix when the prompt's placeholders were counted for unmerged features."""
    if input_ids is None:
        return
    for features, token_id, kind in (
        (image_features, model_config.image_token_id, "image"),
        (video_features, model_config.video_token_id, "video"),
    ):
        if features is None:
            continue
        placeholders = int((input_ids == token_id).sum())
        if placeholders != features.shape[0]:
            raise ValueError(
                f"illava: the prompt holds {placeholders} {kind} placeholder tokens but ViT merging produced "
                f"{features.shape[0]} {kind} features; build inputs with the processor passed to "
                "illava.apply(model, config, processor=processor)"
            )


def span_ids(mask: torch.Tensor, tokens_per_item: list[int]) -> torch.Tensor:
    """`[B, L]` id of the image/video each placeholder belongs to (-1 elsewhere).

    Items are split by their known token counts (items follow each other in prompt order, sample by sample);
    without them (features passed in pre-computed), each contiguous run of placeholders is one item.
    """
    span = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    flat = mask.flatten().nonzero().squeeze(1)
    if flat.numel() == 0:
        return span
    if sum(tokens_per_item) == flat.numel():
        counts = torch.tensor(tokens_per_item, device=mask.device)
        ids = torch.repeat_interleave(torch.arange(len(tokens_per_item), device=mask.device), counts)
    else:
        length = mask.shape[1]
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = (flat[1:] != flat[:-1] + 1) | (flat[1:] % length == 0)
        ids = starts.long().cumsum(0) - 1
    span.view(-1)[flat] = ids
    return span


def _item_starts(span: torch.Tensor) -> torch.Tensor:
    """`[items, 2]` (sample, first position) of each span id 0, 1, ..."""
    samples, positions = (span >= 0).nonzero(as_tuple=True)
    ids = span[samples, positions]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    return torch.stack((samples[first], positions[first]), dim=1).cpu()


