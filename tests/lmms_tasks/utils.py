"""Document functions of the tiny offline lmms-eval tasks (see _illava_tiny_template_yaml)."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

CHOICES = "ABCD"
ROUNDS = 2


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(doc["image"]))).convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return [doc[letter] for letter in CHOICES]


def doc_to_target_index(doc: dict[str, Any]) -> int:
    return CHOICES.index(doc["answer"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": float(results[0].strip().lower() == doc["answer_text"])}


def doc_to_text_rounds(
    doc: dict[str, Any],
    lmms_eval_specific_kwargs: dict[str, str] | None = None,
    previous_output: list[str] | None = None,
    round_idx: int | None = None,
    previous_round_info: Any = None,
):
    """Round 0: the question. Later rounds (multi-round protocol): `(visuals, context, terminal, outputs, info)`."""
    if round_idx is None:
        return doc_to_text(doc, lmms_eval_specific_kwargs)
    if round_idx >= ROUNDS:
        return None, None, True, previous_output, previous_round_info
    context = f"You answered {previous_output[-1]!r}. Look again: {doc['question']}"
    return doc_to_visual(doc), context, False, previous_output, {"round": round_idx}


def process_results_rounds(doc: dict[str, Any], results: list[list[str]]) -> dict[str, float]:
    return {"rounds": float(len(results[0]))}
