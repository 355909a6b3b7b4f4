"""The built-in trained model: a tiny LLaVA-OneVision (SigLIP + Qwen2) that answers questions about generated scenes.

Random weights cannot show whether merging keeps accuracy; this checkpoint can, offline and on CPU. It was trained
by `training/train_tiny_ov.py` on the scenes of `training/scenes.py` (shapes, colours, counts, positions) and
ships in `illava/assets/tiny_ov_scenes/` (see the README there for its accuracy and how it was made).

    model, processor = load_default_model()
    answer_questions(model, processor, [image], ["What is the object's colour?"])   # ["red"]
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny_ov_scenes"

# A question the default model answers and iLLaVA settings that fit its 6 vision and 4 decoder layers: 196 ->
# 106 tokens per crop in the vision tower, half of the visual tokens dropped after decoder layer 2.
EXAMPLE_QUESTION = "What is the object's colour?"
SUGGESTED_SETTINGS = dict(enable_illava_vit=True, illava_vit_k="2-3-4", illava_vit_r=30,
                          enable_illava_llm=True, illava_llm_k="2", illava_llm_r=0.5)

_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}


def load_default_model(device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                       attn_implementation: str = "sdpa", path: str | Path = DEFAULT_MODEL_PATH):
    """`(model, processor)` from the bundled checkpoint (or a retrained one at `path`), without the network.

    The weights are stored in bfloat16 to keep the repository small; `dtype=None` loads them as float32, which is
    what CPUs run fastest and what its accuracy (docs/builtin-model.md) was measured with.
    """
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path}; the default one is made by training/train_tiny_ov.py")
    dtype = torch.float32 if dtype is None else dtype
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    ).to(device).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    logger.info("loaded the default model from %s (%s, %s)", path, model.dtype, device)
    return model, processor


def build_prompt(processor, question: str) -> str:
    """The prompt for one image and one question, exactly as in training: a user turn, then the assistant's start."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def answer_questions(model, processor, images: list, questions: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy, normalised answers, one per (image, question) pair, in one batch."""
    texts = [build_prompt(processor, question) for question in questions]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(model.device)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return decode_answer(processor, generated, inputs)


def decode_answer(processor, generated: torch.Tensor, inputs) -> list[str]:
    """Normalised answers from `model.generate` output (prompt tokens cut off, one string per batch row)."""
    new_tokens = generated[:, inputs["input_ids"].shape[1]:]
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [normalise_answer(text) for text in texts]


def normalise_answer(text: str) -> str:
    """Lower case, surrounding space and punctuation stripped, number words as digits ("Three." -> "3")."""
    text = re.sub(r"^[\s\W_]+|[\s\W_]+$", "", text.strip().lower())
    return _NUMBER_WORDS.get(text, text)
