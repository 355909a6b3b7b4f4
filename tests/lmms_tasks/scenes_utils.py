"""Document functions of the generated-scene lmms-eval tasks (see _illava_scenes_template_yaml): short answers
scored by exact match after normalising ("Three." -> "3"), options by the option the answer picks."""

from __future__ import annotations

import base64
import io
import os
import re
from typing import Any

from PIL import Image

from illava.tools.default_model import normalise_answer


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    if doc.get("video"):
        return [os.path.abspath(doc["video"])]  # the MP4 lies beside the JSON lines, in the folder lmms-eval runs from
    return [Image.open(io.BytesIO(base64.b64decode(doc["image"]))).convert("RGB")]


def _options(doc: dict[str, Any]) -> dict[str, str]:
    return {letter: text for letter, text in doc["options"].items() if text}


def doc_to_text_short(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_text_mc(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    lines = "\n".join(f"{letter}. {text}" for letter, text in _options(doc).items())
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}\n{lines}{kwargs.get('post_prompt', '')}"


def process_results_short(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    hit = normalise_answer(results[0]) == doc["answer_text"]
    return {"accuracy": float(hit), "chance": 1 / len(doc["answer_set"])}


def process_results_mc(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The option the answer picks, read as VLMEvalKit's exact matching reads it: its one standalone option
    letter, else the one option whose text it contains ("B", "blue", "B. blue")."""
    options = _options(doc)
    answer = results[0]
    letters = set(re.findall(rf"\b([{''.join(options)}])\b", answer))
    named = {letter for letter, text in options.items() if text.lower() in answer.lower()}
    picked = letters if letters else named
    return {"accuracy": float(picked == {doc["answer"]}), "chance": 1 / len(options)}
