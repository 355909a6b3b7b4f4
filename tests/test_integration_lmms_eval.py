"""lmms-eval integration: the real `lmms-eval` command on tiny random-weight checkpoints and the tiny offline tasks
in tests/lmms_tasks (generation, multiple choice by loglikelihood, multi-round), merged and baseline.

The lmms-eval tests run where lmms-eval is installed (`pip install -e '.[lmms]'`) and skip elsewhere; the merge
report test needs only illava.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import illava
from illava.report import merge_reports
from illava.tools.tiny_models import tiny_llava_onevision, tiny_qwen2_vl, tiny_qwen3_vl

from .conftest import random_image, tiny_ov, write_mp4

TASKS_DIR = Path(__file__).parent / "lmms_tasks"
TASKS = ["illava_tiny_gen", "illava_tiny_mc", "illava_tiny_rounds"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
OV_MERGE = (
    "enable_illava_vit=True,illava_vit_k=1-2,illava_vit_r=3,enable_illava_llm=True,illava_llm_k=2,illava_llm_r=0.70"
)
QWEN_MERGE = (
    "min_pixels=12544,enable_illava_vit=True,illava_vit_k=1-2,illava_vit_r=0.16,"
    "enable_illava_llm=True,illava_llm_k=2,illava_llm_r=0.70"
)
# 4x5 windows per image and per video frame pair (qwen-vl-utils scales them up to min_pixels), 4 frames a video
QWEN3_INPUTS = "min_pixels=16384,max_pixels=65536,max_num_frames=4"
QWEN3_MERGE = (  # the reference's modes by number
    "enable_illava_vit=True,illava_vit_k=1-2,illava_vit_r=0.15,illava_vit_mode=3,"
    "enable_illava_llm=True,illava_llm_k=3,illava_llm_r=0.70,illava_llm_mode=3"
)

needs_lmms_eval = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed (pip install -e '.[lmms]')"
)


def test_merge_report_counts_tokens_per_stage_and_sample():
    model, processor = tiny_ov()
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": "what?"}]}],
            add_generation_prompt=True,
        )
        for count in (1, 2)
    ]
    images = [random_image(50, 60, seed=0), random_image(56, 112, seed=1), random_image(112, 56, seed=2)]
    config = illava.IllavaConfig(
        enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=3, enable_illava_llm=True, illava_llm_k="2"
    )
    with illava.applied(model, config, processor=processor):
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
        with torch.no_grad():
            model(**inputs)
        reports = merge_reports(model, inputs["input_ids"])
    assert [len(report["items"]) for report in reports] == [1, 2]
    for report in reports:
        stages = report["visual_tokens"]
        assert list(stages) == ["vit_input", "vit_layer_1", "vit_layer_2", "llm_input", "llm_layer_2"]
        assert stages["vit_input"] > stages["vit_layer_1"] > stages["vit_layer_2"]
        assert stages["llm_input"] == sum(item["llm_tokens"] for item in report["items"])
        assert stages["llm_layer_2"] < stages["llm_input"]
        for item in report["items"]:
            assert item["tokens_per_group"] == [16, 13, 10]
    assert sum(report["visual_tokens"]["llm_input"] for report in reports) == int(
        (inputs["input_ids"] == model.config.image_token_id).sum()
    )
    # without iLLaVA only the placeholders the language model receives are known
    assert merge_reports(model, inputs["input_ids"])[0] == {
        "visual_tokens": {"llm_input": reports[0]["visual_tokens"]["llm_input"]},
        "items": [],
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE checkpoints saved as lmms-eval loads
    them (in folders whose names do not say which Qwen3-VL is the MoE one)."""
    root = tmp_path_factory.mktemp("checkpoints")
    built = {
        "ov": tiny_llava_onevision(),
        "qwen2_vl": tiny_qwen2_vl(),
        "qwen2_5_vl": tiny_qwen2_vl(model_class="Qwen2_5_VLForConditionalGeneration"),
        "qwen3_vl": tiny_qwen3_vl(),
        "qwen3_vl_moe": tiny_qwen3_vl(moe=True),
        "qwen3_5": tiny_qwen3_vl(qwen3_5=True, rotary_fraction=0.5),  # full attention at decoder layer 3
    }
    paths = {}
    for name, (model, processor) in built.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
        processor.save_pretrained(paths[name])
    return paths


def run_lmms_eval(model: str, model_args: str, batch_size: int, output: Path, tmp_path: Path) -> dict:
    """Run the `lmms-eval` command offline from the task folder; return the results JSON and logged samples."""
    command = [
        str(Path(sys.executable).with_name("lmms-eval")),
        "--model", model,
        "--model_args", model_args,
        "--tasks", ",".join(TASKS),
        "--include_path", str(TASKS_DIR),
        "--batch_size", str(batch_size),
        "--log_samples",
        "--output_path", str(output),
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}
    completed = subprocess.run(command, cwd=TASKS_DIR, env=env, capture_output=True, text=True, timeout=600)
    log = completed.stdout + completed.stderr
    # lmms-eval exits 0 even when the run failed, so the files are the verdict
    results = sorted(output.glob("*/*_results.json"))
    assert results, f"no results JSON from {' '.join(command)}:\n{log[-6000:]}"
    samples = {
        task: [json.loads(line) for line in next(output.glob(f"*/*_samples_{task}.jsonl")).read_text().splitlines()]
        for task in TASKS
    }
    return {"results": json.loads(results[0].read_text())["results"], "samples": samples, "log": log}


@needs_lmms_eval
@pytest.mark.parametrize(
    "model, checkpoint, extra, batch_size, merged",
    [
        # the reference implementation's command line, on the CPU and a local checkpoint
        (
            "llava_onevision_training_free", "ov",
            f"conv_template=qwen_1_5,model_name=llava_qwen_training_free,device_map=cpu,{OV_MERGE}", 1, True,
        ),
        ("llava_onevision_training_free", "ov", "device_map=cpu", 2, False),
        ("qwen2_vl_training_free", "qwen2_vl", f"device_map=cpu,{QWEN_MERGE}", 2, True),
        ("qwen2_vl_training_free", "qwen2_vl", "device_map=cpu", 1, False),
    ],
    ids=["llava-ov-merged-seed-command", "llava-ov-baseline-batch2", "qwen2-vl-merged-batch2", "qwen2-vl-baseline"],
)  # fmt: skip
def test_lmms_eval_cli(checkpoints, tmp_path, model, checkpoint, extra, batch_size, merged):
    run = run_lmms_eval(model, f"pretrained={checkpoints[checkpoint]},{extra}", batch_size, tmp_path / "logs", tmp_path)
    assert set(run["results"]) == set(TASKS)
    # the console says whether merging is on (lmms-eval shows its loguru logger only)
    assert re.search(r"iLLaVA on \w+ForConditionalGeneration: ViT stage " + ("on" if merged else "off"), run["log"])
    if "conv_template" in extra:  # the reference's loader arguments are accepted, and the console says they are unused
        assert "conv_template=qwen_1_5, model_name=llava_qwen_training_free are reference-only" in run["log"]
    assert run["results"]["illava_tiny_rounds"]["rounds,none"] == 2.0
    assert 0.0 <= run["results"]["illava_tiny_mc"]["acc,none"] <= 1.0
    for task, samples in run["samples"].items():
        assert len(samples) == 4
        for sample in samples:
            counts = sample["token_counts"]
            assert len(counts) == (4 if task == "illava_tiny_mc" else 1)  # one loglikelihood request per choice
            reports = [count["illava"] for count in counts]
            if task == "illava_tiny_rounds":
                assert len(reports[0]) == 2  # one report per round
                reports = reports[0]
            for report in reports:
                stages = report["visual_tokens"]
                assert stages["llm_input"] > 0
                if merged:
                    assert stages["vit_layer_2"] < stages["vit_input"]
                    assert stages["llm_layer_2"] < stages["llm_input"]
                else:
                    assert list(stages) == ["llm_input"]


@needs_lmms_eval
def test_requests_are_batch_invariant_and_loglikelihood_is_the_continuation_loss(checkpoints):
    """In process: batch 1 and batch 2 agree with merging on; the score is the continuation's mean NLL."""
    import types

    from illava.integrations.lmms_eval import LlavaOneVisionTrainingFree

    docs = [{"image": random_image(48 + 8 * i, 64, seed=i)} for i in range(2)]

    def visual(doc: dict) -> list:
        return [doc["image"]]

    def requests(kind: str) -> list:
        """lmms-eval's request arguments: (context, continuation or generation settings, doc_to_visual, doc id,
        task, split)."""
        if kind == "loglikelihood":
            args = [("What color?", f" {c}", visual, i, "t", "test") for i in range(2) for c in ("red", "blue")]
        else:
            settings = {"max_new_tokens": 3, "until": ["\n"]}
            args = [("Describe" * (i + 1), settings, visual, i, "t", "test") for i in range(2)]
        return [types.SimpleNamespace(args=arg) for arg in args]

    outputs = {}
    for batch_size in (1, 2):
        lm = LlavaOneVisionTrainingFree(
            pretrained=str(checkpoints["ov"]), device_map="cpu", batch_size=batch_size, enable_illava_vit=True,
            illava_vit_k="1-2", illava_vit_r=3, enable_illava_llm=True, illava_llm_k="2", illava_llm_r=0.7,
        )  # fmt: skip
        lm.task_dict = {"t": {"test": docs}}
        outputs[batch_size] = (
            [result.text for result in lm.loglikelihood(requests("loglikelihood"))],
            [result.text for result in lm.generate_until(requests("generate"))],
        )
    (scores_1, texts_1), (scores_2, texts_2) = outputs[1], outputs[2]
    assert texts_1 == texts_2
    assert torch.allclose(torch.tensor([s for s, _ in scores_1]), torch.tensor([s for s, _ in scores_2]), atol=1e-4)

    illava.remove(lm.model)  # score one request by hand with the plain model
    processor = lm._illava_processor
    prompt, _ = lm._prompt("What color?", [docs[0]["image"]])
    inputs = processor(text=[prompt + " red"], images=[docs[0]["image"]], return_tensors="pt")
    length = len(processor.tokenizer(" red", add_special_tokens=False).input_ids)
    with torch.no_grad():
        logits = lm.model(**inputs).logits[0]
    logprobs = torch.log_softmax(logits[-length - 1 : -1], dim=-1)
    expected = -logprobs.gather(-1, inputs["input_ids"][0, -length:, None]).mean()
    illava.apply(lm.model, illava.IllavaConfig(), processor=processor)
    [(score, _)] = [result.text for result in lm.loglikelihood(requests("loglikelihood")[:1])]
    assert score == pytest.approx(float(expected), abs=1e-5)


@needs_lmms_eval
def test_qwen2_vl_name_loads_qwen2_5_vl_checkpoints(checkpoints):
    from illava.integrations.lmms_eval import Qwen2VLTrainingFree, Qwen25VLTrainingFree

    lm = Qwen2VLTrainingFree.create_from_arg_string(f"pretrained={checkpoints['qwen2_5_vl']},device_map=cpu")
    assert isinstance(lm, Qwen25VLTrainingFree)
    assert type(lm.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert illava.is_applied(lm.model)


@needs_lmms_eval
@pytest.mark.parametrize(
    "model, checkpoint",
    [
        ("LlavaOneVisionTrainingFree", "ov"),
        ("Qwen2VLTrainingFree", "qwen2_vl"),
        ("Qwen2VLTrainingFree", "qwen2_5_vl"),  # handed to Qwen25VLTrainingFree with the dtype
        ("Qwen3VLTrainingFree", "qwen3_vl"),
        ("Qwen3VLTrainingFree", "qwen3_vl_moe"),
    ],
)
def test_models_load_in_the_dtype_asked_for(checkpoints, model, checkpoint):
    """`dtype` from --model_args, whatever the parent hard-codes (Qwen3-VL's bfloat16 made answers depend on the
    batch size); the float32 tiny checkpoints load as float32 by default ("auto": the checkpoint's own)."""
    import illava.integrations.lmms_eval as integration

    model_class = getattr(integration, model)
    arguments = f"pretrained={checkpoints[checkpoint]},device_map=cpu"
    for extra, dtype in (("", torch.float32), (",dtype=bfloat16", torch.bfloat16), (",dtype=float32", torch.float32)):
        lm = model_class.create_from_arg_string(arguments + extra)
        assert {parameter.dtype for parameter in lm.model.parameters()} == {dtype}, extra
        assert illava.is_applied(lm.model)
    with pytest.raises(ValueError, match="dtype='float33' is not"):
        model_class.create_from_arg_string(arguments + ",dtype=float33")


@needs_lmms_eval
def test_original_llava_next_checkpoint_is_refused_with_conversion_hint(tmp_path):
    from illava.integrations.lmms_eval import LlavaOneVisionTrainingFree

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "architectures": ["LlavaQwenForCausalLM"], "mm_vision_tower": "siglip"})
    )
    with pytest.raises(ValueError, match="convert_llava_onevision_weights_to_hf"):
        LlavaOneVisionTrainingFree(pretrained=str(tmp_path), device_map="cpu")


@needs_lmms_eval
@pytest.mark.parametrize("name", ["/no/such/checkpoint", "./missing-folder", "not a path or hub id"])
def test_a_checkpoint_that_does_not_exist_is_named(name):
    from illava.integrations.lmms_eval import LlavaOneVisionTrainingFree

    with pytest.raises(ValueError, match=f"pretrained={re.escape(repr(name))} does not exist"):
        LlavaOneVisionTrainingFree(pretrained=name, device_map="cpu")


@needs_lmms_eval
def test_missing_decord_gives_an_install_hint():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["decord"] = None  # as if decord were not installed
        from illava.integrations import lmms_eval as integration
        try:
            integration.LlavaOneVisionTrainingFree
        except ImportError as error:
            print(error)
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "'decord'" in completed.stdout and "pip install 'illava[lmms]'" in completed.stdout, completed.stderr


@needs_lmms_eval
def test_entry_point_registers_the_models(tmp_path):
    """As the `lmms-eval` command sees the installed distributions (run elsewhere than the checkout, whose
    illava.egg-info would shadow the installed metadata when it predates the entry point)."""
    script = textwrap.dedent(
        """
        from lmms_eval.models import get_model
        for name in (
            "llava_onevision_training_free", "qwen2_vl_training_free", "qwen2_5_vl_training_free",
            "qwen3_vl_training_free",
        ):
            print(name, get_model(name).__name__)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert completed.stdout.split() == [
        "llava_onevision_training_free", "LlavaOneVisionTrainingFree",
        "qwen2_vl_training_free", "Qwen2VLTrainingFree",
        "qwen2_5_vl_training_free", "Qwen25VLTrainingFree",
        "qwen3_vl_training_free", "Qwen3VLTrainingFree",
    ], completed.stdout + completed.stderr  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_docs(tmp_path_factory) -> list[dict]:
    """An image document and a video document (6 frames at 4 fps; 4 sampled: frames 0, 2, 3, 5)."""
    video = write_mp4(tmp_path_factory.mktemp("videos") / "clip.mp4", frames=6, fps=4)
    return [{"visuals": [random_image(60, 80)]}, {"visuals": [str(video)]}]


def qwen3_requests(kind: str) -> list:
    """lmms-eval's request arguments for the two `qwen3_docs`."""
    import types

    def visuals(doc: dict) -> list:
        return doc["visuals"]

    if kind == "loglikelihood":
        args = [("What is shown?", f" {c}", visuals, i, "t", "test") for i in range(2) for c in ("red", "blue")]
    else:
        settings = {"max_new_tokens": 3, "until": ["\n"]}
        args = [("Describe" * (i + 1), settings, visuals, i, "t", "test") for i in range(2)]
    return [types.SimpleNamespace(args=arg) for arg in args]


@needs_lmms_eval
@pytest.mark.parametrize(
    "checkpoint, model_class",
    [("qwen3_vl", "Qwen3VLForConditionalGeneration"), ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration")],
)
def test_qwen3_vl_generates_and_scores_with_fewer_visual_tokens_when_merging(
    checkpoints, qwen3_docs, checkpoint, model_class
):
    from loguru import logger

    from illava.integrations.lmms_eval import Qwen3VLTrainingFree

    console: list[str] = []
    sink = logger.add(console.append, format="{message}", level="INFO")
    runs = {}
    try:
        for merged in (False, True):
            arguments = f"pretrained={checkpoints[checkpoint]},device_map=cpu,batch_size=2,{QWEN3_INPUTS}"
            # as lmms-eval builds it from --model_args
            lm = Qwen3VLTrainingFree.create_from_arg_string(arguments + (f",{QWEN3_MERGE}" if merged else ""))
            assert type(lm.model).__name__ == model_class  # the MoE folder's name has no "A3B" in it
            lm.task_dict = {"t": {"test": qwen3_docs}}
            generated = lm.generate_until(qwen3_requests("generate"))
            trace = illava.last_trace(lm.model) if merged else None
            scored = lm.loglikelihood(qwen3_requests("loglikelihood"))
            runs[merged] = generated, scored, trace
    finally:
        logger.remove(sink)
    assert any(f"iLLaVA on {model_class}: ViT stage off" in line for line in console)
    assert any(f"iLLaVA on {model_class}: ViT stage on" in line for line in console)
    for generated, scored, _ in runs.values():
        assert [type(result.text) for result in generated] == [str, str]
        assert all(isinstance(loss, float) and loss > 0 and isinstance(greedy, bool) for loss, greedy in
                   (result.text for result in scored))  # fmt: skip
    (baseline, baseline_scores, _), (merged, merged_scores, trace) = runs[False], runs[True]
    for plain, fewer in zip(baseline + baseline_scores, merged + merged_scores):
        before, after = plain.token_counts.illava["visual_tokens"], fewer.token_counts.illava["visual_tokens"]
        assert list(before) == ["llm_input"]
        assert after["vit_layer_2"] < after["vit_input"] and after["llm_layer_3"] < after["llm_input"]
        assert after["llm_input"] < before["llm_input"]
    image, video = trace.vision  # of the last generation batch: the image document, then the video document
    assert image.tokens_per_group == video.tokens_per_group == [20, 17, 15]
    assert video.groups_per_item == [2]  # max_num_frames=4 frames, two per temporal patch


@needs_lmms_eval
def test_qwen3_5_generates_and_scores_with_fewer_visual_tokens_in_both_stages(checkpoints, qwen3_docs):
    from illava.integrations.lmms_eval import Qwen35TrainingFree

    merging = QWEN3_MERGE.replace("illava_llm_k=3", "illava_llm_k=4")  # after the full-attention layer 3
    lm = Qwen35TrainingFree.create_from_arg_string(
        f"pretrained={checkpoints['qwen3_5']},device_map=cpu,batch_size=2,{QWEN3_INPUTS},{merging}")
    assert type(lm.model).__name__ == "Qwen3_5ForConditionalGeneration"
    lm.task_dict = {"t": {"test": qwen3_docs}}
    generated = lm.generate_until(qwen3_requests("generate"))
    scored = lm.loglikelihood(qwen3_requests("loglikelihood"))
    assert [type(result.text) for result in generated] == [str, str]
    for result in generated + scored:
        tokens = result.token_counts.illava["visual_tokens"]
        assert tokens["vit_layer_2"] < tokens["vit_input"] and tokens["llm_layer_4"] < tokens["llm_input"]


@needs_lmms_eval
def test_qwen3_vl_video_prompts_carry_the_frames_times(checkpoints, qwen3_docs):
    """qwen-vl-utils hands the frame indices and the video's fps over: frames 0+2 at 4 fps are stamped 0.25 s and
    frames 3+5 1.0 s (without them the processor would assume 24 fps: 0.0 s and 0.1 s)."""
    from illava.integrations.lmms_eval import Qwen3VLTrainingFree

    lm = Qwen3VLTrainingFree.create_from_arg_string(
        f"pretrained={checkpoints['qwen3_vl']},device_map=cpu,{QWEN3_INPUTS},{QWEN3_MERGE}"
    )
    prompt, visuals = lm._prompt("Describe", qwen3_docs[1]["visuals"])
    text = lm._illava_processor.tokenizer.decode(lm._encode([prompt], [visuals])["input_ids"][0])
    assert "<0.2 seconds>" in text and "<1.0 seconds>" in text
    assert text.count("<|video_pad|>") == 2 * 15  # two temporal slices of 20 windows, 15 left after the ViT merges


@needs_lmms_eval
def test_qwen3_vl_without_merging_answers_as_lmms_evals_own_qwen3_vl(checkpoints, qwen3_docs):
    from lmms_eval.models.simple.qwen3_vl import Qwen3_VL

    from illava.integrations.lmms_eval import Qwen3VLTrainingFree

    arguments = f"pretrained={checkpoints['qwen3_vl']},device=cpu,device_map=cpu,{QWEN3_INPUTS}"
    answers = []
    # lmms-eval's qwen3_vl always loads bfloat16
    for model, extra in ((Qwen3_VL, ""), (Qwen3VLTrainingFree, ",dtype=bfloat16")):
        lm = model.create_from_arg_string(arguments + extra)
        lm.task_dict = {"t": {"test": qwen3_docs}}
        answers.append([getattr(result, "text", result) for result in lm.generate_until(qwen3_requests("generate"))])
    assert answers[0] == answers[1]


@needs_lmms_eval
def test_qwen3_vl_name_refuses_other_checkpoints(checkpoints):
    from illava.integrations.lmms_eval import Qwen3VLTrainingFree

    with pytest.raises(ValueError, match="qwen3_vl / qwen3_vl_moe checkpoints .* has model_type 'qwen2_vl'"):
        Qwen3VLTrainingFree(pretrained=str(checkpoints["qwen2_vl"]), device_map="cpu")
