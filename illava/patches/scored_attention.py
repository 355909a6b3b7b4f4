"""A merge layer's attention that also scores its tokens, through transformers' `AttentionInterface`.

A merge layer needs the attention each token receives in that layer. Computing it beside the layer's own attention
is a second pass over q and k (on CPU at 2304 tokens: sdpa 43 ms, the side pass 38 ms). Instead, the merge layer's
attention module (that instance only: it gets a copy of its config naming `illava_scored`) runs one more
implementation registered in the `AttentionInterface`, which computes the output and the scores from one set of
probabilities (`merge.attend_and_score`: 50 ms together). The module keeps its own projections and rotary
embedding; only the softmax(q k^T) v step is replaced, only where the model runs sdpa, and only in a call where
the layer removes tokens (otherwise sdpa runs as it would unpatched: r=0 computes exactly what the model does).
Flash attention (packed varlen kernels), eager attention, CUDA sdpa and calls that record gradients keep their
kernels: the scores then come from a side pass.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import compat, merge
from ..state import IllavaState

NAME = "illava_scored"
FUSED_IMPLEMENTATIONS = ("sdpa",)
_SLOT = "_illava_scores"


def score_in_attention(state: IllavaState, attention: torch.nn.Module, slot: dict) -> bool:
    """Route `attention`'s softmax(q k^T) v through `scored_attention` when it runs sdpa: while `slot["score"]` is
    true, each call appends the received attention of the segment it attended over to `slot["received"]` (`[n]`
    fp32, summed over the segment's queries, averaged over heads). Other implementations are left alone. Returns
    whether it routed."""
    original = compat.attention_implementation(attention.config)
    if original not in FUSED_IMPLEMENTATIONS:
        return False
    compat.register_attention(NAME, scored_attention)
    state.set_attribute(attention, "config", compat.with_attention_implementation(attention.config, NAME))
    state.set_attribute(attention, _SLOT, (slot, original))
    return True


def scored_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The `AttentionInterface` implementation `illava_scored` (`query/key/value [B, H, n, d]`): returns
    `([B, n, H, d], None)` like sdpa / eager, and hands the received attention to the module's slot."""
    slot, original = getattr(module, _SLOT)
    if not slot.get("score"):
        return compat.attention_function(original)(module, query, key, value, attention_mask, scaling=scaling,
                                                   dropout=dropout, **kwargs)
    if attention_mask is not None or (dropout and module.training):
        raise RuntimeError(f"illava: {type(module).__name__} called a scored merge layer with an attention mask or "
                           "dropout; illava's ViT merge layers expect neither")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    differentiable = torch.is_grad_enabled() and any(part.requires_grad for part in (query, key, value))
    # on CUDA sdpa's fused kernels are faster than one fp32 pass; attend_and_score is for inference only
    if query.device.type == "cuda" or differentiable:
        output, _ = compat.attention_function(original)(module, query, key, value, None, scaling=scale, **kwargs)
        received = merge.attention_received(query, key, scale) * query.shape[-2]
    else:
        output, received = merge.attend_and_score(query, key, value, scale)
    slot.setdefault("received", []).append(received.flatten())
    return output, None
