"""Train the built-in default model: a tiny LLaVA-OneVision (SigLIP + Qwen2) on generated scenes, on a CPU.

The model has the real architecture (`LlavaOnevisionForConditionalGeneration`, a SigLIP vision tower read at its
last layer with the "full" strategy, a 2-layer GELU projector, a Qwen2 decoder, anyres crops with newline
tokens) at a few million parameters, and 224 px crops in 16 px patches: 14x14 = 196 visual tokens per crop.
Training runs on inputs made by the processor and the chat template exactly as inference makes them (a user
turn with the image or video and the question, then the assistant's answer and `<|im_end|>`); the loss covers only
the answers and `<|im_end|>`. Held-out accuracy is exact match of greedy `generate` output.

The questions come as the model's own templates and as evaluation harnesses ask them unmodified (see
`training.scenes.in_format`): VLMEvalKit's multiple-choice prompt and lmms-eval's short-answer and
multiple-choice suffixes, answered by a word (the option's text in multiple choice), some opening with lmms-eval's
system turn. Videos (a coloured shape moving across 4-8 frames) go through LLaVA-OneVision's video path: one
`<video>` placeholder, each frame's 14x14 tokens pooled 2x2.

Stages from random initialisation:
1. the vision tower learns dense per-patch targets (colour, shape, zone, form, count, location) through a
   linear head, which then seeds the projector, so the decoder starts out seeing the tower's predictions;
1b. the decoder learns, from text-only conversations, which kind of answer each question and format asks for;
2. everything trains on question answering about images and videos (the tower at a tenth of the rate).

`--init-from CHECKPOINT` skips stage 1 and runs 1b and 2 on a trained model. That is how the committed model was
made: from the first built-in model (trained from scratch on its own templates only, 91% held out; kept at git
commit ad2a315 with its command in its model card), which learns the harness formats and videos in half an hour
without losing its own. From scratch, all formats at once reach 50% on the model's own templates in 1000 steps
(training/logs/from_scratch_all_formats.log).

    git worktree add /tmp/illava-v1 ad2a315      # the first built-in model, as committed
    python training/train_tiny_ov.py --init-from /tmp/illava-v1/illava/assets/tiny_ov_scenes \
        --language-steps 100 --steps 600 --lr 1e-3 --warmup 25 --curriculum 0       # the committed model, ~40 min
    python training/train_tiny_ov.py --steps 300 --eval 64 --out /tmp/try              # a quick experiment from scratch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `training` and `illava` import from the checkout

from illava.tools.default_model import DEFAULT_MODEL_PATH, answer_questions, normalise_answer  # noqa: E402
from illava.tools.tiny_models import build_llava_onevision, byte_level_tokenizer  # noqa: E402
from training.scenes import (  # noqa: E402
    ANSWERS, COLOURS, COUNTS, KINDS, LOCATION_BINS, OPTION_LETTERS, SHAPES, SIZE, SYSTEM_PROMPT, VOCABULARY, ZONES,
    Question, Sample, VideoSample, in_format, mcq_choice, patch_labels, sample, sample_video,
)

PATCH = 16
# Stage 1 loss weights of the per-patch targets (colour, shape, zone, form, count, column, row): the global
# count, at full weight, holds back learning shape and zone (measured: both stayed at chance for 300 steps).
_TARGET_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 0.3, 0.5, 0.5)
_TARGET_NAMES = ("colour", "shape", "zone", "form", "count", "column", "row")
PINPOINTS = [[SIZE, SIZE]]  # one high-resolution crop besides the base crop: 2 x 196 + 14 newlines per image
# Frames per training video, one count per step (a batch stacks its videos); few, as every frame costs a crop's
# pass through the vision tower (held-out videos also have 8)
VIDEO_FRAMES = (4, 5, 6)
# How the turns of a training conversation ask: the first, which inference reproduces, the model's own way most
# often and each harness's way the rest; the later ones only in the short formats (a byte-level tokenizer makes a
# multiple-choice turn 100-170 tokens long, and a batch is as long as its longest conversation). A conversation
# opens with lmms-eval's system turn now and then, and lmms-eval's own `llava_hf` puts a newline between the image
# placeholder and the question.
FIRST_TURN_FORMATS = {"own": 0.4, "vlmeval_mcq": 0.25, "lmms_short": 0.1, "lmms_mc": 0.25}
LATER_TURN_FORMATS = {"own": 0.6, "lmms_short": 0.4}
SYSTEM_RATE = 0.4
MEDIA_NEWLINE_RATE = 0.15


def build_model(vision_width: int, vision_layers: int, text_width: int, text_layers: int, seed: int):
    """A freshly initialised model and its processor (tokenizer, image and video processors, chat template)."""
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(list(VOCABULARY))
    tokenizer.padding_side = "left"  # batched generation needs it; training uses it too, so the layouts agree
    model, processor = build_llava_onevision(
        tokenizer, SIZE, PATCH, PINPOINTS,
        vision=dict(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                    num_attention_heads=vision_width // 32),
        text=dict(hidden_size=text_width, intermediate_size=3 * text_width, num_hidden_layers=text_layers,
                  num_attention_heads=text_width // 48,
                  num_key_value_heads=text_width // 48,  # full multi-head: looking up "the circle" needs keys per head
                  max_position_embeddings=2048, tie_word_embeddings=True),
        seed=seed,
    )
    model.generation_config.max_new_tokens = 8
    model.generation_config.do_sample = False
    return model, processor


def load_trained(path: Path):
    """A trained checkpoint (weights in float32) and its processor, its vocabulary grown by any `VOCABULARY` words
    it lacks (new rows start at the mean embedding, as `resize_token_embeddings` makes them)."""
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = LlavaOnevisionProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    missing = [word for word in VOCABULARY if word not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
        model.resize_token_embeddings(len(tokenizer))
    model.set_attn_implementation("sdpa")
    return model, processor


def conversation(processor, turns: list[Question], rng: random.Random, media: str | None = "image") -> str:
    """The chat-template text of a conversation about one image or video (`media` "image", "video", or None for
    text only), one turn per question as asked (`ask`), main question first.

    The first turn is exactly what a harness sends for one question (lmms-eval's system turn or not, the
    placeholder, the question) followed by the answer and `<|im_end|>`; the later turns ask other questions about
    the same media, which buys several supervised answers for one pass of the vision tower and the visual tokens.
    `rng` is the conversation's own stream (`conversation_rng`).
    """
    messages = []
    if rng.random() < SYSTEM_RATE:
        messages.append({"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]})
    for number, turn in enumerate(turns):
        content = [{"type": "text", "text": turn.text}]
        if number == 0 and media:
            newline = "\n" if rng.random() < MEDIA_NEWLINE_RATE else ""
            content = [{"type": media}, {"type": "text", "text": newline + turn.text}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": turn.answer}]
    text = processor.apply_chat_template(messages, tokenize=False)
    first_answer = next(index for index, message in enumerate(messages) if message["role"] == "assistant")
    prompt = processor.apply_chat_template(messages[:first_answer], tokenize=False, add_generation_prompt=True)
    if not text.startswith(prompt + messages[first_answer]["content"] + "<|im_end|>"):
        raise RuntimeError("the training conversation does not start with the inference prompt")
    return text


def ask(questions: list[Question], rng: random.Random) -> list[Question]:
    """The questions as a training conversation asks them: the first in a format drawn from `FIRST_TURN_FORMATS`,
    the later ones from `LATER_TURN_FORMATS`."""
    asked = []
    for number, question in enumerate(questions):
        formats = LATER_TURN_FORMATS if number else FIRST_TURN_FORMATS
        asked.append(in_format(question, rng.choices(list(formats), weights=list(formats.values()))[0], rng))
    return asked


def conversation_rng(split: str, media: str, index: int) -> random.Random:
    """The stream that picks the formats of conversation `index` about `split`'s `media`: a function of those."""
    return random.Random(f"illava-formats/{split}/{media}/{index}")


def questions_of(item: Sample | VideoSample, turns: int) -> list[Question]:
    """The main question and up to `turns - 1` others about the same scene or video."""
    return [Question(item.kind, item.question, item.answer), *item.more_questions[: turns - 1]]


def training_batch(processor, images: dict[int, Sample], videos: dict[int, VideoSample], turns: int,
                   split: str = "train") -> dict[str, torch.Tensor]:
    """Processor inputs for conversations about `images` and `videos` (by index in `split`; the videos with one
    frame count), labels only on the assistant turns' answers and their `<|im_end|>`."""
    texts = []
    for media, items in (("image", images), ("video", videos)):
        for index, item in items.items():
            rng = conversation_rng(split, media, index)
            texts.append(conversation(processor, ask(questions_of(item, turns), rng), rng, media))
    inputs = processor(images=[item.image for item in images.values()] or None,
                       videos=[video_array(item) for item in videos.values()] or None,
                       text=texts, return_tensors="pt", padding=True)
    inputs["labels"] = answer_labels(processor.tokenizer, inputs["input_ids"])
    return inputs


def video_array(item: VideoSample) -> np.ndarray:
    """`[frames, height, width, 3]` uint8, what the video processor takes (and what video readers return)."""
    return np.stack([np.asarray(frame) for frame in item.frames])


def answer_labels(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """`input_ids` with everything but the assistant turns (answer and `<|im_end|>`) set to -100."""
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(input_ids, -100)
    for row, ids in enumerate(input_ids.tolist()):
        for start in range(len(ids) - len(header)):
            if ids[start : start + len(header)] == header:
                first = start + len(header)
                last = ids.index(end, first)
                labels[row, first : last + 1] = input_ids[row, first : last + 1]
    return labels


def warm_up_language(model, processor, steps: int, batch_size: int, lr: float, video_share: float,
                     log_every: int = 50) -> None:
    """Stage 1b: text-only conversations, so the decoder learns which kind of answer each question asks for.

    Without it, stage 2 stalls: at the answer position a question's key word is one token among 400 visual ones,
    and a model that cannot yet tell "shape" from "colour" questions answers both with the colour it reads best
    (measured: shape questions stayed below chance for 400 steps). Here the conversations are the training ones
    (images' and videos', `video_share` of them videos') without the media, so an answer's kind, and in the
    multiple-choice formats that it is one of the options offered, is all there is to learn. The optimiser state
    is dropped afterwards.
    """
    decoder = [p for name, p in model.named_parameters() if not name.startswith("model.vision_tower.")]
    optimizer = torch.optim.AdamW(decoder, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    tokenizer = processor.tokenizer
    videos = round(batch_size * video_share)
    start, running = time.time(), 0.0
    for step in range(steps):
        texts = []
        for offset in range(batch_size):
            index = step * batch_size + offset
            media = "video" if offset < videos else "image"
            # a video's questions only: its two-frame version renders fastest
            item = sample_video("language", index, frames=2) if media == "video" else sample("language", index)
            rng = conversation_rng("language", media, index)
            turns = ask(questions_of(item, 4), rng)
            texts.append(conversation(processor, turns, rng, None))
        inputs = tokenizer(texts, return_tensors="pt", padding=True)
        inputs["labels"] = answer_labels(tokenizer, inputs["input_ids"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, max(1, steps // 10))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"[{time.strftime('%H:%M:%S')} +{(time.time() - start) / 60:5.1f} min] language step {step + 1}/{steps} "
                  f"loss {running / log_every:.3f} (uniform answers of the right kind: about 0.7)", flush=True)
            running = 0.0


def pretrain_vision(model, processor, steps: int, batch_size: int, lr: float, log_every: int = 50) -> torch.nn.Linear:
    """Stage 1: teach the vision tower what is where, with dense per-patch targets and a throwaway linear head.

    Learning to read a scene only through the answers is slow from scratch: the language model has to learn
    where to look and what the features mean at the same time, and position questions stall for hundreds of
    steps. Here the tower's output for each patch of the base crop (the features the LLM reads) is trained to
    tell the colour, shape, zone and location of the coloured shape covering it and how many coloured shapes the
    scene holds. Returns the linear head, which `seed_projector` builds into the projector.
    """
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    sizes = (len(COLOURS) + 1, len(SHAPES) + 1, len(ZONES) + 1, len(SHAPES) + 1, len(COUNTS), LOCATION_BINS + 1,
             LOCATION_BINS + 1)
    head = torch.nn.Linear(width, sum(sizes))
    parameters = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    start, running, hits = time.time(), 0.0, np.zeros(len(sizes))
    for step in range(steps):
        batch = [sample("vision", step * batch_size + offset) for offset in range(batch_size)]
        pixels = processor.image_processor([item.image for item in batch], return_tensors="pt")["pixel_values"][:, 0]
        labels = torch.from_numpy(np.stack([patch_labels(item, PATCH) for item in batch]))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, max(1, steps // 10))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = tower(pixels, output_hidden_states=True).hidden_states[-1]
            logits = head(features).float().split(sizes, dim=-1)
        loss = sum(weight * torch.nn.functional.cross_entropy(part.flatten(0, 1), labels[..., column].flatten())
                   for column, (part, weight) in enumerate(zip(logits, _TARGET_WEIGHTS)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        objects = labels[..., 0] > 0  # score the patches of coloured shapes: the background is the easy majority
        hits += [float((part.argmax(-1) == labels[..., column])[objects].float().mean()) for column, part in enumerate(logits)]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            accuracy = " ".join(f"{name} {value:.2f}" for name, value in zip(_TARGET_NAMES, hits / log_every))
            print(f"[{time.strftime('%H:%M:%S')} +{(time.time() - start) / 60:5.1f} min] vision step {step + 1}/{steps} "
                  f"loss {running / log_every:.3f} patch accuracy on shapes: {accuracy}", flush=True)
            running, hits = 0.0, np.zeros(len(sizes))
    return head


@torch.no_grad()
def seed_projector(model, head: torch.nn.Linear) -> None:
    """Start the projector off passing stage 1's per-patch predictions to the decoder, in its first channels.

    Colour, which the tower's features carry strongly, is read within 200 steps of stage 2 from a random projector;
    shape and position, carried more faintly, stayed at chance for 400 steps (measured). Here the projector's first
    layer computes the head's logits (and their negations, so the GELU keeps both signs) and its second layer
    passes them on unchanged; every weight stays trainable.
    """
    projector = model.model.multi_modal_projector
    logits = head.out_features
    projector.linear_1.weight[:logits] = head.weight
    projector.linear_1.bias[:logits] = head.bias
    projector.linear_1.weight[logits : 2 * logits] = -head.weight
    projector.linear_1.bias[logits : 2 * logits] = -head.bias
    projector.linear_2.weight[:, : 2 * logits] = 0.0
    projector.linear_2.weight[: 2 * logits, : 2 * logits] = torch.eye(2 * logits)


@torch.no_grad()
def evaluate(model, processor, items: list[Sample], batch_size: int = 32) -> dict[str, float]:
    """Exact-match accuracy of greedy `generate`, overall and per question kind."""
    model.eval()
    hits = {kind: [] for kind in KINDS}
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        answers = answer_questions(model, processor, [item.image for item in batch], [item.question for item in batch])
        for item, answer in zip(batch, answers):
            hits[item.kind].append(answer == item.answer)
    model.train()
    result = {kind: float(np.mean(values)) for kind, values in hits.items() if values}
    result["all"] = float(np.mean([hit for values in hits.values() for hit in values]))
    return result


# Held-out suites besides the model's own image questions (`evaluate`): the harnesses' formats, with and without
# lmms-eval's system turn (VLMEvalKit's LLaVA-OneVision entries send none), on the same held-out scenes, and videos.
# (name, media, prompt format, system turn, frames per video)
HELD_OUT_SUITES = (
    ("image vlmeval_mcq", "image", "vlmeval_mcq", False, 0),
    ("image lmms_short", "image", "lmms_short", False, 0),
    ("image lmms_short + system", "image", "lmms_short", True, 0),
    ("image lmms_mc", "image", "lmms_mc", False, 0),
    ("image lmms_mc + system", "image", "lmms_mc", True, 0),
    ("video own, 8 frames", "video", "own", False, 8),
    ("video own, 4 frames", "video", "own", False, 4),
    ("video vlmeval_mcq, 8 frames", "video", "vlmeval_mcq", False, 8),
    ("video lmms_short + system, 8 frames", "video", "lmms_short", True, 8),
    ("video lmms_mc + system, 8 frames", "video", "lmms_mc", True, 8),
)


def harness_prompt(processor, media: str, text: str, system: bool) -> str:
    """The prompt VLMEvalKit's `IllavaChat` and illava's lmms-eval models send for one image or video and `text`."""
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}] if system else []
    messages.append({"role": "user", "content": [{"type": media}, {"type": "text", "text": text}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def evaluate_suite(model, processor, suite: tuple, count: int, batch_size: int = 16) -> dict[str, float]:
    """Exact-match accuracy of greedy `generate` on `count` held-out items of one `HELD_OUT_SUITES` entry, overall
    ("all") and per question kind, and the accuracy of guessing ("chance": one over the options offered, or over
    the kind's answer set)."""
    name, media, prompt_format, system, frames = suite
    model.eval()
    hits, chances = {}, []
    for start in range(0, count, batch_size):
        indices = range(start, min(count, start + batch_size))
        items = [sample("test", index) if media == "image" else sample_video("test", index, frames) for index in indices]
        turns = [in_format(Question(item.kind, item.question, item.answer), prompt_format,
                           random.Random(f"illava-held-out/{name}/{index}")) for index, item in zip(indices, items)]
        inputs = processor(
            text=[harness_prompt(processor, media, turn.text, system) for turn in turns],
            images=[item.image for item in items] if media == "image" else None,
            videos=[video_array(item) for item in items] if media == "video" else None,
            return_tensors="pt", padding=True,
        )
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        texts = processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for turn, text in zip(turns, texts):
            if turn.options:  # scored as VLMEvalKit scores it: by the option it picks
                hit = mcq_choice(text, turn.options) == OPTION_LETTERS[turn.options.index(turn.answer)]
            else:
                hit = normalise_answer(text) == normalise_answer(turn.answer)
            hits.setdefault(turn.kind, []).append(hit)
            chances.append(1 / len(turn.options or ANSWERS[turn.kind]))
    model.train()
    result = {kind: float(np.mean(values)) for kind, values in hits.items()}
    result["all"] = float(np.mean([hit for values in hits.values() for hit in values]))
    result["chance"] = float(np.mean(chances))
    return result


def evaluate_suites(model, processor, count: int) -> dict[str, dict[str, float]]:
    results = {}
    for suite in HELD_OUT_SUITES:
        results[suite[0]] = evaluate_suite(model, processor, suite, count)
        print(f"  {suite[0]}: {format_result(results[suite[0]])}", flush=True)
    return results


def format_result(result: dict[str, float]) -> str:
    kinds = ", ".join(f"{kind} {value:.1%}" for kind, value in result.items() if kind not in ("all", "chance"))
    chance = f", chance {result['chance']:.1%}" if "chance" in result else ""
    return f"{result['all']:.1%} ({kinds}{chance})"


def teacher_forced_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(answers whose every token the model predicts given the ones before, answers): a running accuracy proxy."""
    predicted = logits[:, :-1].argmax(-1).tolist()
    hits = answers = 0
    for row, targets in enumerate(labels[:, 1:].tolist()):
        right = None
        for position, target in enumerate(targets + [-100]):
            if target == -100:
                if right is not None:
                    hits, answers, right = hits + right, answers + 1, None
                continue
            right = (right is None or right) and predicted[row][position] == target
    return hits, answers


def model_card(summary: dict, command: str) -> str:
    accuracy = summary["held_out_accuracy"]
    per_kind = ", ".join(f"{kind} {accuracy[kind]:.1%}" for kind in KINDS)
    suites = "\n".join(f"  - {name}: {format_result(result)}" for name, result in summary["held_out_suites"].items())
    return f"""# tiny_ov_scenes: illava's built-in demo model

A small `LlavaOnevisionForConditionalGeneration` (SigLIP vision tower + Qwen2 decoder, {summary["parameters"] / 1e6:.1f} M
parameters, random initialisation, no pretrained weights) trained from scratch on the generated scenes of
`training/scenes.py`: textured backgrounds, clutter, grey decoy shapes and 1-4 coloured shapes, with templated
questions about the coloured shapes' colour, shape, position and count, and short videos of one coloured shape
moving (its direction, colour and shape). It answers its own templates and the same questions as VLMEvalKit's
multiple-choice prompt and lmms-eval's short-answer and multiple-choice prompts ask them, with or without
lmms-eval's system turn. It knows nothing else: it is a demo model for these scenes, made so that merging can be
scored offline, not a general VLM. For real use pass a real LLaVA-OneVision checkpoint (`--model_path` /
`from_pretrained`).

- Input: 224x224 images in 16 px patches: a base crop and one high-resolution crop of 14x14 = 196 tokens each,
  plus 14 newline tokens (406 visual tokens); videos of 4-8 frames, 7x7 pooled tokens per frame plus one newline
  token; the chat template and byte-level tokenizer are saved with it.
- Held-out accuracy (greedy exact match, {summary["held_out_samples"]} scenes of the test split, weights as
  stored in bfloat16 and run in float32; config.json says float32, so `dtype="auto"` loads it that way):
  {accuracy["all"]:.1%} ({per_kind}).
- The same scenes as the harnesses ask (multiple choice: 2-5 options, answered with the option's text, which
  VLMEvalKit's exact matching maps to its letter) and
  {summary["held_out_samples"]} held-out videos, next to the accuracy of guessing:
{suites}
- Trained in {summary["train_minutes"]} min on {summary["machine"]}, {summary["threads"]} threads:

      {command}
{provenance(summary)}
- Load it with `illava.tools.default_model.load_default_model()`; `training_summary.json` holds every setting.
"""


def provenance(summary: dict) -> str:
    """Where a continued training started (empty for one from scratch)."""
    start = summary["args"].get("init_from", "None")
    if start == "None":
        return ""
    return (f"\n  continuing from the checkpoint at `{start}` (stage 1 skipped): the first built-in model, trained\n"
            "  from scratch on its own templates; it is kept at git commit ad2a315 (`git worktree add /tmp/illava-v1\n"
            "  ad2a315`, then `--init-from /tmp/illava-v1/illava/assets/tiny_ov_scenes`).\n")


def machine() -> str:
    """The CPU, its core count and the library versions, for the record of how a checkpoint was made."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}"


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision-steps", type=int, default=1000, help="stage 1: dense pretraining of the vision tower")
    parser.add_argument("--vision-batch", type=int, default=32)
    parser.add_argument("--vision-lr", type=float, default=3e-3)
    parser.add_argument("--language-steps", type=int, default=100, help="stage 1b: text-only answer kinds")
    parser.add_argument("--language-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000, help="stage 2: question answering")
    parser.add_argument("--batch", type=int, default=16, help="stage 2 image conversations per step")
    parser.add_argument("--video-batch", type=int, default=3, help="stage 2 video conversations per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--vision-lr-scale", type=float, default=0.1,
                        help="stage 2 learning rate of the pretrained vision tower, relative to --lr")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--vision-width", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--text-width", type=int, default=192)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--curriculum", type=float, default=0.1,
                        help="fraction of the steps over which scene difficulty ramps from 0 to 1 (0: no ramp)")
    parser.add_argument("--turns", type=int, default=4, help="questions per training conversation (1: single turn)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=500, help="held-out samples for the final accuracy, per suite")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between interim evaluations (0: none)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bfloat16 autocast")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from this trained checkpoint: no stage 1, its architecture and processor")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if args.init_from:
        model, processor = load_trained(args.init_from)
    else:
        model, processor = build_model(args.vision_width, args.vision_layers, args.text_width, args.text_layers, args.seed)
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters / 1e6:.2f} M parameters; {vars(args)}", flush=True)

    # The pretrained tower only fine-tunes (a smaller rate), so stage 2 cannot wash out what stage 1 taught it.
    groups = {}
    for name, parameter in model.named_parameters():
        decays = parameter.ndim >= 2 and "embed" not in name
        in_tower = name.startswith("model.vision_tower.")
        groups.setdefault((decays, in_tower), []).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": args.weight_decay if decays else 0.0,
          "scale": args.vision_lr_scale if in_tower else 1.0} for (decays, in_tower), params in groups.items()],
        lr=args.lr, betas=(0.9, 0.98),
    )
    held_out = [sample("test", index) for index in range(args.eval)]
    start = time.time()
    if not args.init_from:
        seed_projector(model, pretrain_vision(model, processor, args.vision_steps, args.vision_batch, args.vision_lr))
    warm_up_language(model, processor, args.language_steps, args.language_batch, args.lr,
                     video_share=args.video_batch / (args.batch + args.video_batch))
    running_loss = running_hits = running_answers = running_steps = 0
    for step in range(args.steps):
        difficulty = min(1.0, step / (args.curriculum * args.steps)) if args.curriculum > 0 else 1.0
        images = {index: sample("train", index, difficulty) for index in range(step * args.batch, (step + 1) * args.batch)}
        frames = VIDEO_FRAMES[step % len(VIDEO_FRAMES)]
        videos = {index: sample_video("train", index, frames, difficulty)
                  for index in range(step * args.video_batch, (step + 1) * args.video_batch)}
        inputs = training_batch(processor, images, videos, args.turns)
        for group in optimizer.param_groups:
            group["lr"] = group["scale"] * learning_rate(step, args.steps, args.lr, args.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            output = model(**inputs)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        hits, answers = teacher_forced_hits(output.logits, inputs["labels"])
        running_loss += output.loss.item()
        running_hits += hits
        running_answers += answers
        running_steps += 1
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            elapsed = time.time() - start
            print(
                f"[{time.strftime('%H:%M:%S')} +{elapsed / 60:5.1f} min] step {step + 1}/{args.steps} "
                f"difficulty {difficulty:.2f} lr {learning_rate(step, args.steps, args.lr, args.warmup):.2e} loss {running_loss / running_steps:.3f} "
                f"train-acc {running_hits / running_answers:.3f}",
                flush=True,
            )
            running_loss = running_hits = running_answers = running_steps = 0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"  interim held-out accuracy (128): {evaluate(model, processor, held_out[:128])}", flush=True)
            evaluate_suites(model, processor, 32)

    train_seconds = time.time() - start
    model.to(torch.bfloat16).to(torch.float32)  # score the weights as stored (bfloat16), loaded as float32
    accuracy = evaluate(model, processor, held_out)
    print(f"trained in {train_seconds / 60:.1f} min; held-out accuracy on {len(held_out)}: {accuracy}", flush=True)
    suites = evaluate_suites(model, processor, args.eval)

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)  # half the size; see load_default_model
    # ...but measured in float32: `dtype="auto"` (lmms-eval's and VLMEvalKit's default) reads the config's dtype
    config_path = args.out / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(args.out)
    summary = {
        "parameters": parameters,
        "train_minutes": round(train_seconds / 60, 1),
        "threads": args.threads,
        "machine": machine(),
        "held_out_samples": len(held_out),
        "held_out_accuracy": accuracy,
        "held_out_suites": suites,
        "args": {key: str(value) for key, value in vars(args).items()},
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    command = "python " + shlex.join(["training/train_tiny_ov.py", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "README.md").write_text(model_card(summary, command))
    size = sum(path.stat().st_size for path in args.out.iterdir() if path.is_file())
    print(f"saved to {args.out} ({size / 2**20:.1f} MiB)", flush=True)


if __name__ == "__main__":
    main()
