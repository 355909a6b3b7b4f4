"""VLMEvalKit integration: a full offline run of VLMEvalKit's run.py through `python -m illava.integrations.vlmeval`
on a tiny Qwen2-VL checkpoint and a tiny MCQ TSV under $LMUData, and one whose model cannot be built (a non-zero
exit); the Qwen3-VL entries' settings and one of their generations on a tiny Qwen3-VL checkpoint.

The run needs VLMEvalKit (a source checkout, `pip install -e`) and skips without it; the import test checks the
other side: without VLMEvalKit the module refuses to import with an install hint.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import pytest

import illava
from illava.tools.tiny_models import tiny_qwen2_vl, tiny_qwen3_vl

from .conftest import random_image, write_mp4

HAS_VLMEVAL = importlib.util.find_spec("vlmeval") is not None
DATASET = "IllavaTinyMCQ"
MODEL = "Qwen2-VL-7B-Instruct-iLLaVA"  # ViT k=12-13-14-15 r=0.16, LLM k=6-7-8 keep 0.90
QWEN3_MODELS = {
    "Qwen3-VL-8B-Instruct-iLLaVA": "Qwen/Qwen3-VL-8B-Instruct",
    "Qwen3-VL-2B-Instruct-iLLaVA": "Qwen/Qwen3-VL-2B-Instruct",
}


@pytest.mark.skipif(HAS_VLMEVAL, reason="VLMEvalKit is installed here")
def test_import_without_vlmeval_names_the_install():
    with pytest.raises(ImportError, match="pip install -e VLMEvalKit"):
        import illava.integrations.vlmeval  # noqa: F401


def write_mcq_tsv(path) -> None:
    """VLMEvalKit's MCQ format: index, question, options A-D, answer letter, base64 image, category."""
    import pandas as pd

    rows = []
    for index, (question, answer) in enumerate([("Which color dominates?", "A"), ("Which shape is it?", "C")] * 2):
        buffer = io.BytesIO()
        random_image(40 + 8 * index, 56, seed=index).save(buffer, format="PNG")
        rows.append(
            {
                "index": index, "question": question, "A": "red", "B": "green", "C": "circle", "D": "square",
                "answer": answer, "image": base64.b64encode(buffer.getvalue()).decode(), "category": "tiny",
            }
        )  # fmt: skip
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


needs_vlmeval = pytest.mark.skipif(not HAS_VLMEVAL, reason="VLMEvalKit is not installed (a source checkout, pip install -e)")


def launch(tmp_path, checkpoint) -> subprocess.CompletedProcess:
    """`python -m illava.integrations.vlmeval` offline on the tiny MCQ TSV with `MODEL` loading `checkpoint`."""
    data = tmp_path / "LMUData"
    data.mkdir(exist_ok=True)
    write_mcq_tsv(data / f"{DATASET}.tsv")
    command = [
        sys.executable, "-m", "illava.integrations.vlmeval",
        "--data", DATASET, "--model", MODEL,
        "--model-path", str(checkpoint),
        "--model-args", '{"max_new_tokens": 8, "min_pixels": 12544, "max_pixels": 50176}',
        "--judge", "exact_matching",  # no API judge: offline
        "--work-dir", str(tmp_path / "outputs"),
    ]  # fmt: skip
    env = {
        **os.environ, "LMUData": str(data), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }  # fmt: skip
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def save_tiny_qwen2_vl(folder, **sizes):
    model, processor = tiny_qwen2_vl(**sizes)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@needs_vlmeval
def test_launcher_runs_vlmevalkit_on_a_tiny_checkpoint(tmp_path):
    # deep enough for the 7B layer choices
    checkpoint = save_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl", vision_depth=16, text_layers=9)
    completed = launch(tmp_path, checkpoint)
    log = completed.stdout + completed.stderr
    work = tmp_path / "outputs"
    predictions = list(work.glob(f"{MODEL}/*/{MODEL}_{DATASET}.xlsx"))
    scores = list(work.glob(f"{MODEL}/*/{MODEL}_{DATASET}_acc.csv"))
    assert completed.returncode == 0 and predictions and scores, log[-6000:]
    assert log.count("iLLaVA visual tokens per stage") == 4, log[-6000:]
    settings = json.loads((work / MODEL / "illava_settings.json").read_text())  # recorded with the results
    assert settings["model_path"] == str(checkpoint) and settings["illava"]["illava_vit_k"] == [12, 13, 14, 15]
    assert "'vit_layer_15'" in log and "'llm_layer_8'" in log
    # the launcher's own lines reach the console, logged before VLMEvalKit sets up its logging
    settings_line = rf"INFO - vlmeval\.illava: iLLaVA settings of {MODEL} \(also in .+\): ViT stage on"
    assert re.search(settings_line, completed.stdout) and log.count(f"iLLaVA settings of {MODEL}") == 1, log[:6000]


@needs_vlmeval
def test_launcher_exits_non_zero_when_the_model_cannot_be_built(tmp_path):
    """VLMEvalKit's run.py logs a failed model x dataset combination and exits 0; the launcher does not."""
    checkpoint = save_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl")  # 6 ViT layers: the entry merges at 12-15
    completed = launch(tmp_path, checkpoint)
    log = completed.stdout + completed.stderr
    assert completed.returncode == 1, log[-6000:]
    last_line = completed.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"illava: VLMEvalKit's run\.py failed: Model {MODEL} x Dataset {DATASET} combination failed: "
        r"illava_vit_k=12-13-14-15: layer\(s\) \[12, 13, 14, 15\] beyond .*",
        last_line,
    ), log[-6000:]
    assert not list((tmp_path / "outputs").glob(f"{MODEL}/*/{MODEL}_{DATASET}.xlsx"))


@needs_vlmeval
def test_model_args_are_checked_before_any_model_loads(tmp_path):
    from illava.integrations.vlmeval import entries

    with pytest.raises(ValueError, match=r"\['enable_illava_llm'\] are iLLaVA options; put them under \"illava_options\""):
        entries(None, {"enable_illava_llm": False})
    with pytest.raises(ValueError, match="illava_vit_r=1.0"):
        entries(None, {"illava_options": {"illava_vit_r": 1.0}})
    with pytest.raises(ValueError, match="--model-path='/no/such/folder' does not exist"):
        entries("/no/such/folder")
    with pytest.raises(ValueError, match=r"--model-args=\[16\] must be a JSON object of IllavaChat keywords"):
        entries(None, [16])
    # illava_options update the entry's settings instead of replacing them
    options = entries(str(tmp_path), {"illava_options": {"enable_illava_llm": False}})[MODEL].keywords["illava_options"]
    assert options["enable_illava_llm"] is False and options["illava_vit_k"] == "12-13-14-15"


@needs_vlmeval
@pytest.mark.parametrize("model", [MODEL, *QWEN3_MODELS])
def test_settings_are_recorded_and_a_work_dir_with_other_settings_is_refused(tmp_path, model):
    from illava.integrations.vlmeval import entries, record_settings

    arguments = ["--model", model, "--data", DATASET, "--work-dir", str(tmp_path)]
    record_settings(entries(str(tmp_path)), arguments)
    recorded = json.loads((tmp_path / model / "illava_settings.json").read_text())
    assert recorded["illava"]["enable_illava_llm"] is True
    record_settings(entries(str(tmp_path)), arguments)  # the same settings again: fine
    with pytest.raises(SystemExit, match="holds results of .* made with other settings"):
        record_settings(entries(str(tmp_path), {"illava_options": {"enable_illava_llm": False}}), arguments)


@needs_vlmeval
def test_qwen3_vl_entries_carry_the_references_settings_in_illava_terms():
    """The reference keeps 0.85 of the ViT windows per layer (illava: merges 0.15 away) and 0.7 of the LLM's visual
    tokens (illava: the same), with its mode 3 in both stages; pixels and prompts are VLMEvalKit's own defaults."""
    from illava.config import IllavaConfig
    from illava.integrations.vlmeval import Qwen3VLIllavaChat, entries

    for name, checkpoint in QWEN3_MODELS.items():
        entry = entries()[name]
        assert entry.func is Qwen3VLIllavaChat and entry.keywords["model_path"] == checkpoint
        assert set(entry.keywords) == {"model_path", "illava_options"}  # Qwen3VLChat's pixel and frame defaults
        config = IllavaConfig.from_dict(entry.keywords["illava_options"])
        assert (config.enable_illava_vit, config.illava_vit_r) == (True, 0.15)
        assert config.illava_vit_k == (2, 3, 4, 5, 6, 7, 8)
        assert (config.enable_illava_llm, config.illava_llm_k, config.illava_llm_r) == (True, (19, 21, 23, 25), 0.7)
        assert (config.illava_vit_mode, config.illava_llm_mode, config.illava_pc_ratio) == ("pivot", "pivot", 0.05)


@needs_vlmeval
def test_qwen3_vl_entry_generates_on_a_tiny_checkpoint(tmp_path):
    """One `generate_inner` of Qwen3-VL-8B-Instruct-iLLaVA with an image and a video (8 frames at 4 fps: 2 s,
    sampled at Qwen3VLChat's 2 fps: 4 frames, two temporal slices), deep enough for the entry's layers."""
    from illava.integrations.vlmeval import entries

    checkpoint = tmp_path / "tiny-qwen3-vl"
    model, processor = tiny_qwen3_vl(vision_depth=9, text_layers=26)
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    random_image(60, 80).save(tmp_path / "image.png")
    video = write_mp4(tmp_path / "clip.mp4", frames=8, fps=4)
    registered = entries(str(checkpoint), {"max_new_tokens": 4, "min_pixels": 16384, "max_pixels": 65536})
    chat = registered["Qwen3-VL-8B-Instruct-iLLaVA"]()
    message = [
        {"type": "image", "value": str(tmp_path / "image.png")},
        {"type": "video", "value": str(video)},
        {"type": "text", "value": "What changes?"},
    ]
    assert isinstance(chat.generate_inner(message, dataset="IllavaTinyVideo"), str)
    trace = illava.last_trace(chat.model)
    image, clip = trace.vision
    assert image.tokens_per_group == clip.tokens_per_group == [20, 17, 15, 13, 12, 11, 10, 9]  # 4x5 windows, r=0.15
    assert clip.groups_per_item == [2]
    assert [entry.layer for entry in trace.language] == [19, 21, 23, 25]
    prompt = processor.tokenizer.decode(chat._inputs(message, None)["input_ids"][0])
    assert "<0.2 seconds>" in prompt and "<1.5 seconds>" in prompt  # frames 0+2 and 5+7 of the 4 fps video
    # the Qwen2-VL entries refuse a Qwen3-VL checkpoint before loading it
    with pytest.raises(ValueError, match="model_type 'qwen3_vl' \\(Qwen3VLIllavaChat loads it\\)"):
        registered[MODEL]()
