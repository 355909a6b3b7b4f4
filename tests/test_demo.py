"""The demo's handler on a tiny model, without a browser."""

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest

from illava.tools import demo
from illava.tools.demo import DemoSession
from illava.tools.tiny_models import tiny_llava_onevision

from .conftest import random_image


@pytest.fixture(scope="module")
def session():
    model, processor = tiny_llava_onevision(image_size=56, vision_layers=4, text_layers=4)
    return DemoSession(model, processor, "tiny random LLaVA-OneVision")


def test_handler_answers_with_report_and_heatmaps(session, tmp_path):
    paths = []
    for index in range(2):
        random_image(60, 80, seed=index).save(tmp_path / f"{index}.png")
        paths.append(str(tmp_path / f"{index}.png"))
    answer, report, heatmaps = session.handle(paths, None, "What-is-this?", "1-2", "3", "2", "0.5", True, True,
                                              max_new_tokens=3)
    assert isinstance(answer, str)
    assert "ViT image: 2 x crop/frame, tokens 16 -> 13 -> 10" in report and "LLM layer 2" in report
    assert heatmaps and all(Path(path).exists() for path in heatmaps)
    assert any("attention_map_llm_layer_" in path for path in heatmaps)


def test_handler_reports_bad_input(session):
    answer, report, heatmaps = session.handle(None, None, "hi", "1-2", "3", "2", "0.5", True, True)
    assert answer == "" and "give an image" in report and heatmaps == []
    answer, report, _ = session.handle(None, None, "hi", "1-9", "3", "2", "0.5", True, True)
    assert "Error" in report


def test_page_builds_when_gradio_is_installed(session):
    pytest.importorskip("gradio")
    from illava.tools.demo import build_app

    assert build_app(session) is not None


@pytest.mark.parametrize("kind", ["image", "video"])
def test_an_unreadable_file_is_named_on_the_page(session, tmp_path, kind):
    broken = tmp_path / ("broken.png" if kind == "image" else "broken.mp4")
    broken.write_bytes(b"not a picture")
    images, video = ([str(broken)], None) if kind == "image" else (None, str(broken))
    answer, report, heatmaps = session.handle(images, video, "hi", "1-2", "3", "2", "0.5", True, True)
    assert answer == "" and heatmaps == []
    assert f"cannot {'read image' if kind == 'image' else 'decode video'}" in report and "broken" in report


def fake_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return module


def exit_status(argv: list[str]) -> int:
    """What `illava-demo` exits with: main's return value, or argparse's SystemExit code."""
    try:
        return demo.main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def test_missing_gradio_is_said_before_any_model_loads(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what a machine without gradio does
    monkeypatch.setattr(demo, "load_model", lambda args: pytest.fail("the model was loaded"))
    assert demo.main([]) == 2
    error = capsys.readouterr().err
    assert "pip install 'illava[demo]'" in error and error.count("\n") == 1


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model_path", "/nonexistent"], "--model_path '/nonexistent' does not exist"),
        (["--device", "nonsense"], "--device 'nonsense' is not a device torch knows"),
        (["--device", "cuda:99"], "--device 'cuda:99'"),
        (["--attn_implementation", "flash_attention_2"], "pip install 'illava[flash]'"),
        (["--attn_implementation", "magic"], "'magic'"),
        (["--port", "70000"], "'70000' is not a port number"),
    ],
)
def test_bad_arguments_exit_2_with_a_line_naming_them(monkeypatch, capsys, arguments, message):
    monkeypatch.setitem(sys.modules, "gradio", fake_module("gradio"))  # installed or not, the checks come first
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    if "--model_path" not in arguments:
        monkeypatch.setattr(demo, "load_model", lambda args: pytest.fail("the model was loaded"))
    assert exit_status(arguments) == 2
    assert message in capsys.readouterr().err
