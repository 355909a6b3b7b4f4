"""The bundled trained model loads offline, answers questions about generated scenes, and is the CLI's default."""

import json
import random
from pathlib import Path

import pytest
from PIL import Image

import illava
from illava.tools import cli
from illava.tools.default_model import (
    DEFAULT_MODEL_PATH,
    EXAMPLE_QUESTION,
    SUGGESTED_SETTINGS,
    answer_questions,
    build_prompt,
    load_default_model,
    normalise_answer,
)
from illava.tools.demo import DemoSession
from training.scenes import ANSWERS, KINDS, OPTION_LETTERS, SYSTEM_PROMPT, TEMPLATES, Question, in_format, mcq_choice, sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def default_model(offline):
    return load_default_model()


def answers(model, processor, items) -> list[str]:
    return answer_questions(model, processor, [item.image for item in items], [item.question for item in items])


def test_checkpoint_is_small_and_complete():
    files = {path.name: path.stat().st_size for path in DEFAULT_MODEL_PATH.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md", "training_summary.json"} <= set(files)
    assert sum(files.values()) < 25 * 2**20
    summary = json.loads((DEFAULT_MODEL_PATH / "training_summary.json").read_text())
    assert summary["held_out_accuracy"]["all"] >= 0.9


def test_harness_default_dtype_loads_it_as_measured(offline):
    """Weights are stored in bfloat16, the model card measured float32: dtype="auto" (lmms-eval's and VLMEvalKit's
    default) must load float32."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL_PATH, dtype="auto", local_files_only=True)
    assert model.dtype == torch.float32
    stored = load_file(DEFAULT_MODEL_PATH / "model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.bfloat16}  # still half the size on disk


def test_scenes_are_deterministic_and_splits_differ():
    first, again = sample("test", 3), sample("test", 3)
    assert (first.question, first.answer) == (again.question, again.answer)
    assert first.image.tobytes() == again.image.tobytes()
    assert sample("test", 3).image.tobytes() != sample("train", 3).image.tobytes()


def test_questions_do_not_give_the_answer_away():
    """Each kind's answers are spread over its whole answer set, and every template of a kind sees several."""
    items = [sample("train", index) for index in range(400)]
    for kind in KINDS:
        of_kind = [item for item in items if item.kind == kind]
        assert {item.answer for item in of_kind} == set(ANSWERS[kind])
        for template in TEMPLATES[kind]:
            assert len({item.answer for item in of_kind if item.question == template}) >= 3


def test_normalise_answer():
    assert normalise_answer(" Red.\n") == "red"
    assert normalise_answer("Three!") == "3"


def test_known_answers(default_model):
    model, processor = default_model
    # 10 of the first 12 held-out scenes, each question kind included; the checkpoint misses scenes 3 (a count of
    # 3 read as 2) and 9 (a star read as a square), which are among its 8% held-out errors.
    items = [sample("test", index) for index in (0, 1, 2, 4, 5, 6, 7, 8, 10, 11)]
    assert answers(model, processor, items) == [item.answer for item in items]


def test_held_out_accuracy(default_model):
    model, processor = default_model
    items = [sample("test", index) for index in range(1000, 1048)]
    predicted = answers(model, processor, items)
    assert all(answer in ANSWERS[item.kind] for answer, item in zip(predicted, items))
    accuracy = sum(answer == item.answer for answer, item in zip(predicted, items)) / len(items)
    assert accuracy >= 0.85


@pytest.mark.parametrize("prompt_format, system", [("vlmeval_mcq", False), ("lmms_mc", True), ("lmms_short", True)])
def test_it_answers_the_harnesses_prompts(default_model, prompt_format, system):
    """VLMEvalKit's MCQ prompt and lmms-eval's suffixes (with its system turn): the option picked as VLMEvalKit's
    exact matching reads the answer, or the word; far above the chance of guessing."""
    model, processor = default_model
    items = [sample("test", index) for index in range(1000, 1032)]
    asked = [in_format(Question(item.kind, item.question, item.answer), prompt_format, random.Random(index))
             for index, item in enumerate(items)]
    system_turn = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}] if system else []
    prompts = [processor.apply_chat_template(system_turn + [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question.text}]}], add_generation_prompt=True) for question in asked]
    inputs = processor(images=[item.image for item in items], text=prompts, return_tensors="pt", padding=True)
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    texts = processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if prompt_format == "lmms_short":
        hits = [normalise_answer(text) == question.answer for text, question in zip(texts, asked)]
        chance = 1 / 4.5
    else:
        hits = [mcq_choice(text, question.options) == OPTION_LETTERS[question.options.index(question.answer)]
                for text, question in zip(texts, asked)]
        chance = sum(1 / len(question.options) for question in asked) / len(asked)
    assert sum(hits) / len(hits) >= max(0.75, chance + 0.4), texts


def test_a_grey_image_gets_no_right_answers_for_free(default_model):
    """With the scene replaced by grey, accuracy falls to about chance: the answers come from the image."""
    model, processor = default_model
    items = [sample("test", index) for index in range(1000, 1048)]
    for item in items:
        item.image = Image.new("RGB", item.image.size, (128, 128, 128))
    accuracy = sum(a == item.answer for a, item in zip(answers(model, processor, items), items)) / len(items)
    assert accuracy <= 0.45


def test_illava_applies_to_the_default_model(default_model):
    model, processor = default_model
    items = [sample("test", index) for index in range(8)]
    with illava.applied(model, SUGGESTED_SETTINGS, processor=processor):
        inputs = processor(images=[items[0].image], text=build_prompt(processor, items[0].question), return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * 106 + 1
        predicted = answers(model, processor, items)
        assert illava.last_trace(model).vision[0].tokens_per_group == [196, 166, 136, 106]
    assert all(answer in ANSWERS[item.kind] for answer, item in zip(predicted, items))


def test_cli_runs_the_default_model(offline, tmp_path, capsys):
    status = cli.main(["--input_path", str(ROOT / "examples" / "scene.png"), "--question", EXAMPLE_QUESTION,
                       *[f"--{name}={value}" for name, value in SUGGESTED_SETTINGS.items()],
                       "--illava_track_vit_source", "True", "--output_dir", str(tmp_path), "--compare"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "the built-in default model" in printed
    assert "[baseline] answer: red" in printed and "[illava] answer: red" in printed
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "attention_map_vit_layer_2.jpg", "attention_map_vit_layer_3.jpg", "attention_map_vit_layer_4.jpg"]


def test_demo_starts_with_settings_that_fit_the_default_model(default_model):
    model, processor = default_model
    session = DemoSession(model, processor, "default", question=EXAMPLE_QUESTION,
                          config=illava.IllavaConfig(**SUGGESTED_SETTINGS))
    config = session.config
    answer, report, heatmaps = session.handle(
        [str(ROOT / "examples" / "scene.png")], None, session.question, "-".join(map(str, config.illava_vit_k)),
        str(config.illava_vit_r), "-".join(map(str, config.illava_llm_k)), str(config.illava_llm_r), True, True)
    assert answer == "red", report
    assert heatmaps
