"""Train the built-in default model: a tiny LLaVA-OneVision (SigLIP + Qwen2) on generated scenes, on a CPU.

The model has the real architecture (`LlavaOnevisionForConditionalGeneration`, a SigLIP vision tower read at its
last layer with the "full" strategy, a 2-layer GELU projector, a Qwen2 decoder, anyres crops with newline
tokens) at a few million parameters, and 224 px crops in 16 px patches: 14x14 = 196 visual tokens per crop.
Training runs on inputs made by the processor and the chat template exactly as inference makes them (a user
turn with the image and the question, then the assistant's answer and `<|im_end|>`); the loss covers only the
answer and `<|im_end|>`. Held-out accuracy is exact match of greedy `generate` output.

    python training/train_tiny_ov.py                              # the committed model (2 threads, ~35 min)
    python training/train_tiny_ov.py --steps 300 --eval 64 --out /tmp/try   # a quick experiment
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `training` and `illava` import from the checkout

from illava.default_model import DEFAULT_MODEL_PATH, build_prompt, build_target, decode_answer  # noqa: E402
from illava.tiny_models import CHAT_TEMPLATE, byte_level_tokenizer  # noqa: E402
from training.scenes import KINDS, SIZE, Sample, sample  # noqa: E402

PATCH = 16
PINPOINTS = [[SIZE, SIZE]]  # one high-resolution crop besides the base crop: 2 x 196 + 14 newlines per image


def build_model(vision_width: int, vision_layers: int, text_width: int, text_layers: int, seed: int):
    """A freshly initialised model and its processor (tokenizer, image and video processors, chat template)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = byte_level_tokenizer()
    tokenizer.padding_side = "left"  # batched generation needs it; training uses it too, so the layouts agree
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=vision_width,
            intermediate_size=4 * vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_width // 32,
            image_size=SIZE,
            patch_size=PATCH,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=3 * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=text_width // 64,
            num_key_value_heads=max(1, text_width // 128),
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = 8
    model.generation_config.do_sample = False

    size = {"height": SIZE, "width": SIZE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(SIZE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def training_batch(processor, batch: list[Sample]) -> dict[str, torch.Tensor]:
    """Processor inputs for prompt + answer, labels only on the answer tokens and `<|im_end|>`.

    Rows are left-padded, so each row's target is its last tokens.
    """
    texts = [build_prompt(processor, item.question) + build_target(item.answer) for item in batch]
    inputs = processor(images=[item.image for item in batch], text=texts, return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    for row, item in enumerate(batch):
        length = len(processor.tokenizer(build_target(item.answer), add_special_tokens=False)["input_ids"])
        labels[row, -length:] = inputs["input_ids"][row, -length:]
    inputs["labels"] = labels
    return inputs


@torch.no_grad()
def evaluate(model, processor, items: list[Sample], batch_size: int = 32) -> dict[str, float]:
    """Exact-match accuracy of greedy `generate`, overall and per question kind."""
    model.eval()
    hits = {kind: [] for kind in KINDS}
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        texts = [build_prompt(processor, item.question) for item in batch]
        inputs = processor(images=[item.image for item in batch], text=texts, return_tensors="pt", padding=True)
        answers = decode_answer(processor, model.generate(**inputs, max_new_tokens=8, do_sample=False), inputs)
        for item, answer in zip(batch, answers):
            hits[item.kind].append(answer == item.answer)
    model.train()
    result = {kind: float(np.mean(values)) for kind, values in hits.items() if values}
    result["all"] = float(np.mean([hit for values in hits.values() for hit in values]))
    return result


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--vision-width", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--text-width", type=int, default=256)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=500, help="held-out samples for the final accuracy")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between interim evaluations (0: none)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bfloat16 autocast")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model, processor = build_model(args.vision_width, args.vision_layers, args.text_width, args.text_layers, args.seed)
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters / 1e6:.2f} M parameters; {vars(args)}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    held_out = [sample("test", index) for index in range(args.eval)]
    start = time.time()
    running_loss = running_hits = running_count = 0.0
    for step in range(args.steps):
        batch = [sample("train", step * args.batch + offset) for offset in range(args.batch)]
        inputs = training_batch(processor, batch)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            output = model(**inputs)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # teacher-forced exact match of the whole target: a cheap running proxy of accuracy
        labels = inputs["labels"][:, 1:]
        predicted = output.logits[:, :-1].argmax(-1)
        correct = ((predicted == labels) | (labels == -100)).all(dim=1)
        running_loss += output.loss.item()
        running_hits += float(correct.sum())
        running_count += 1
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            elapsed = time.time() - start
            print(
                f"[{time.strftime('%H:%M:%S')} +{elapsed / 60:5.1f} min] step {step + 1}/{args.steps} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} loss {running_loss / running_count:.3f} "
                f"train-acc {running_hits / (running_count * args.batch):.3f}",
                flush=True,
            )
            running_loss = running_hits = running_count = 0.0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"  interim held-out accuracy (128): {evaluate(model, processor, held_out[:128])}", flush=True)

    train_seconds = time.time() - start
    model.to(torch.bfloat16).to(torch.float32)  # score the weights as stored (bfloat16), loaded as float32
    accuracy = evaluate(model, processor, held_out)
    print(f"trained in {train_seconds / 60:.1f} min; held-out accuracy on {len(held_out)}: {accuracy}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)  # half the size; see load_default_model
    processor.save_pretrained(args.out)
    summary = {
        "parameters": parameters,
        "train_minutes": round(train_seconds / 60, 1),
        "threads": args.threads,
        "held_out_samples": len(held_out),
        "held_out_accuracy": accuracy,
        "args": {key: str(value) for key, value in vars(args).items()},
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    size = sum(path.stat().st_size for path in args.out.iterdir() if path.is_file())
    print(f"saved to {args.out} ({size / 2**20:.1f} MiB)", flush=True)


if __name__ == "__main__":
    main()
