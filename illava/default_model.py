"""The built-in trained model: a tiny LLaVA-OneVision (SigLIP + Qwen2) that answers questions about generated scenes.

Random weights cannot show whether merging keeps accuracy; this checkpoint can, offline and on CPU. It was trained
by `training/train_tiny_ov.py` on the scenes of `training/scenes.py` (shapes, colours, counts, positions) and
ships in `illava/assets/tiny_ov_scenes/` (see the README there for its accuracy and how it was made).

    model, processor = load_default_model()
    inputs = processor(images=[image], text=build_prompt(processor, "What colour is the circle?"), return_tensors="pt")
    answer = decode_answer(processor, model.generate(**inputs, max_new_tokens=8, do_sample=False), inputs)
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "assets" / "tiny_ov_scenes"

_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}


def load_default_model(device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                       attn_implementation: str = "sdpa"):
    """`(model, processor)` from the bundled checkpoint, without touching the network.

    The weights are stored in bfloat16 to keep the repository small; `dtype=None` loads them as float32, which is
    what CPUs run fastest and what the accuracy in the README was measured with.
    """
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    if not (DEFAULT_MODEL_PATH / "config.json").is_file():
        raise FileNotFoundError(f"the default model is missing from {DEFAULT_MODEL_PATH}; see training/train_tiny_ov.py")
    dtype = torch.float32 if dtype is None else dtype
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        DEFAULT_MODEL_PATH, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    ).to(device).eval()
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL_PATH, local_files_only=True)
    logger.info("loaded the default model from %s (%s, %s)", DEFAULT_MODEL_PATH, model.dtype, device)
    return model, processor


def build_prompt(processor, question: str) -> str:
    """The prompt for one image and one question, exactly as in training: a user turn, then the assistant's start."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_target(answer: str) -> str:
    """What the assistant turn holds after `build_prompt`'s text in training: the answer and the end-of-turn token."""
    return f"{answer}<|im_end|>"


def decode_answer(processor, generated: torch.Tensor, inputs) -> list[str]:
    """Normalised answers from `model.generate` output (prompt tokens cut off, one string per batch row)."""
    new_tokens = generated[:, inputs["input_ids"].shape[1]:]
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [normalise_answer(text) for text in texts]


def normalise_answer(text: str) -> str:
    """Lower case, surrounding space and punctuation stripped, number words as digits ("Three." -> "3")."""
    text = re.sub(r"^[\s\W_]+|[\s\W_]+$", "", text.strip().lower())
    return _NUMBER_WORDS.get(text, text)
