"""The built-in model scored by the real harnesses, unmodified, on held-out generated scenes and videos:
VLMEvalKit's run.py on an MCQ TSV (its own MCQ prompt, `--judge exact_matching`) and the `lmms-eval` command on
the scene tasks in tests/lmms_tasks (lmms-eval's short-answer and option-letter suffixes, its system turn, images
and MP4 videos), each unmerged and with the model's suggested iLLaVA settings.

Unmerged, the model must be far above chance in every task: a harness whose prompts the model cannot follow
scores near chance, merged or not, and says nothing about merging. Merged, it must stay above chance while the
visual tokens actually drop. The accuracies are logged (`pytest -o log_cli=true --log-cli-level=INFO`).

Each harness runs where it is installed (VLMEvalKit: a source checkout; lmms-eval: `pip install -e '.[lmms]'`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from illava.tools.default_model import DEFAULT_MODEL_PATH, SUGGESTED_SETTINGS
from training.harness_data import write_lmms_scenes, write_vlmeval_mcq_tsv

logger = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).parent / "lmms_tasks"
SCENE_TASKS = ["illava_scenes_short", "illava_scenes_mc", "illava_scenes_video_short", "illava_scenes_video_mc"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
IMAGES, VIDEOS, START = 64, 32, 2000  # held-out test-split items beyond those the model card and tests use
# Unmerged: at least this far above chance in every task. Merged: above chance by a smaller margin.
UNMERGED_MARGIN, MERGED_MARGIN = 0.3, 0.1
MERGE_ARGS = ",".join(f"{key}={value}" for key, value in SUGGESTED_SETTINGS.items())


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    completed = subprocess.run(command, cwd=cwd, env={**os.environ, **OFFLINE, **env}, capture_output=True,
                               text=True, timeout=900)
    return completed.stdout + completed.stderr


@pytest.mark.skipif(importlib.util.find_spec("vlmeval") is None,
                    reason="VLMEvalKit is not installed (a source checkout, pip install -e)")
def test_vlmevalkit_mcq_on_generated_scenes(tmp_path):
    import pandas as pd  # a VLMEvalKit dependency, not one of the test extra's

    data = tmp_path / "LMUData"
    write_vlmeval_mcq_tsv(data / "IllavaScenesMCQ.tsv", start=START, count=IMAGES)
    rows = pd.read_csv(data / "IllavaScenesMCQ.tsv", sep="\t")
    chance = float((1 / rows[list("ABCDE")].notna().sum(axis=1)).mean())
    work = tmp_path / "outputs"
    models = ["illava-tiny-ov-scenes", "illava-tiny-ov-scenes-iLLaVA"]
    log = run([sys.executable, "-m", "illava.integrations.vlmeval", "--data", "IllavaScenesMCQ", "--model", *models,
               "--judge", "exact_matching", "--work-dir", str(work)], tmp_path, {"LMUData": str(data)})
    accuracy = {}
    for model in models:
        scores = list(work.glob(f"{model}/*/{model}_IllavaScenesMCQ_acc.csv"))
        assert scores, log[-6000:]  # VLMEvalKit logs a failed run and exits 0: the files are the verdict
        table = pd.read_csv(scores[0])
        accuracy[model] = {column: float(table[column].iloc[0]) for column in table.columns if column != "split"}
    logger.info("VLMEvalKit accuracy: %s", json.dumps({**accuracy, "chance": chance}))
    unmerged, merged = accuracy["illava-tiny-ov-scenes"], accuracy["illava-tiny-ov-scenes-iLLaVA"]
    assert unmerged["Overall"] >= chance + UNMERGED_MARGIN, (unmerged, chance)
    assert merged["Overall"] >= chance + MERGED_MARGIN, (merged, chance)
    assert log.count("iLLaVA visual tokens per stage") >= 1, log[-6000:]  # the merged entry did merge


@pytest.fixture(scope="module")
def scenes_folder(tmp_path_factory) -> Path:
    return write_lmms_scenes(tmp_path_factory.mktemp("scenes"), start=START, images=IMAGES, videos=VIDEOS)


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                    reason="lmms-eval is not installed (pip install -e '.[lmms]')")
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_lmms_eval_tasks_on_generated_scenes(scenes_folder, tmp_path, merged):
    output = tmp_path / "logs"
    model_args = f"pretrained={DEFAULT_MODEL_PATH},device_map=cpu,max_frames_num=8"
    if merged:
        model_args += f",{MERGE_ARGS}"
    log = run([str(Path(sys.executable).with_name("lmms-eval")), "--model", "llava_onevision_training_free",
               "--model_args", model_args, "--tasks", ",".join(SCENE_TASKS), "--include_path", str(TASKS_DIR),
               "--batch_size", "8", "--log_samples", "--output_path", str(output)], scenes_folder,
              {"HF_HOME": str(tmp_path / "hf_home")})
    results = sorted(output.glob("*/*_results.json"))
    assert results, log[-6000:]  # lmms-eval exits 0 even when the run failed
    scores = json.loads(results[0].read_text())["results"]
    accuracy = {task: (scores[task]["accuracy,none"], scores[task]["chance,none"]) for task in SCENE_TASKS}
    logger.info("lmms-eval accuracy and chance, %s: %s", "merged" if merged else "unmerged", json.dumps(accuracy))
    margin = MERGED_MARGIN if merged else UNMERGED_MARGIN
    for task, (hit_rate, chance) in accuracy.items():
        assert hit_rate >= chance + margin, (task, accuracy)
    samples = [json.loads(line) for line in next(output.glob("*/*_samples_illava_scenes_video_mc.jsonl")).open()]
    stages = samples[0]["token_counts"][0]["illava"]["visual_tokens"]
    if merged:  # frames merged in the vision tower and again in the decoder
        assert stages["vit_layer_4"] < stages["vit_input"] and stages["llm_layer_2"] < stages["llm_input"]
    else:
        assert list(stages) == ["llm_input"]
