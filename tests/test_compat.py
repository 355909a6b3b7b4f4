"""The version-dependent names of `illava.compat` match the installed transformers, and `apply` warns outside
the tested window."""

import inspect
import logging
import re
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2Model

import illava
from illava import compat
from illava.tools.tiny_models import tiny_llava_onevision

from .conftest import random_image


def test_cache_keyword_is_the_one_the_decoder_takes():
    for forward in (Qwen2DecoderLayer.forward, Qwen2Model.forward):
        assert compat.CACHE_KEYWORD in inspect.signature(forward).parameters


def test_cache_is_found_under_either_keyword_and_in_outputs(small_ov):
    model, processor = small_ov
    inputs = processor(images=[[random_image(56, 56)]], text="<image>hi", return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs, use_cache=True)
    cache = compat.output_cache(output)
    assert isinstance(cache, transformers.Cache) and cache.get_seq_length() == inputs["input_ids"].shape[1]
    assert compat.cache_argument({compat.CACHE_KEYWORD: cache}) is cache
    assert compat.cache_argument({"past_key_values": cache}) is cache  # callers still using the deprecated name
    assert compat.cache_argument({}) is None


def test_image_and_video_features_are_what_the_placeholders_received(small_ov):
    model, processor = small_ov
    inputs = processor(images=[[random_image(40, 90)]], text="<image>hi", return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
    features = compat.image_features(output)
    assert features.dim() == 2 and features.shape[0] == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert compat.video_features(output) is None


@pytest.mark.parametrize(
    "version, tested",
    [("5.20.0", True), ("5.22.2", True), ("5.25.0", True), ("5.25.9", True), ("5.26.0.dev0", False),
     ("5.19.9", False), ("5.26.0", False), ("6.0.0", False), ("4.57.1", False)],
)
def test_tested_window(version, tested):
    assert compat.is_tested(version) is tested


def test_pyproject_declares_the_lowest_tested_release_and_no_upper_cap():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    requirement = next(entry for entry in project["dependencies"] if entry.startswith("transformers"))
    lowest = re.fullmatch(r"transformers>=([\d.]+)", requirement)
    assert lowest, f"{requirement!r}: a lower bound only (an upper cap silently downgrades users' transformers)"
    assert compat.TESTED_LOWEST.startswith(lowest.group(1))


def test_the_installed_transformers_is_inside_the_tested_window():
    """CI's newest environment installs the newest release on PyPI: a new release fails here until the suite has
    passed on it and `compat.TESTED_NEWEST_MINOR` (the one place that states the window) says so."""
    assert compat.is_tested(transformers.__version__), (
        f"transformers {transformers.__version__} is outside the tested window ({compat.TESTED_WINDOW}): if the rest "
        "of the suite passes on it, widen the window in illava/compat.py"
    )


def warnings_when_applied(monkeypatch, caplog, version: str, times: int) -> list[str]:
    model, _ = tiny_llava_onevision(image_size=56, vision_layers=2, text_layers=2)
    monkeypatch.setattr(compat, "_warned", False)
    monkeypatch.setattr(compat, "installed_version", lambda: version)
    with caplog.at_level(logging.WARNING, logger="illava"):
        for _ in range(times):
            with illava.applied(model, enable_illava_vit=True, illava_vit_k="1", illava_vit_r=2):
                pass
    return [record.getMessage() for record in caplog.records if "tested window" in record.getMessage()]


def test_apply_warns_once_outside_the_tested_window(monkeypatch, caplog):
    warnings = warnings_when_applied(monkeypatch, caplog, "5.31.0", times=2)
    assert len(warnings) == 1 and "5.31.0" in warnings[0] and compat.TESTED_WINDOW in warnings[0]
    assert "outside the tested window" in warnings[0]


def test_apply_is_quiet_inside_the_tested_window(monkeypatch, caplog):
    assert warnings_when_applied(monkeypatch, caplog, "5.22.2", times=1) == []


def test_the_readme_states_the_tested_window():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    stated = re.search(r"\*\*Tested window: transformers ([\d.]+) - ([\d.]+),", readme)
    assert stated and compat.TESTED_LOWEST.startswith(stated.group(1)), stated
    assert stated.group(2) == compat.TESTED_NEWEST_MINOR, stated
