"""run_inference_once.py / illava.tools.cli end to end on tiny checkpoints saved to disk, and heatmap content."""

import importlib.machinery
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from illava.tools import cli
from illava.tools.tiny_models import tiny_llava_onevision, tiny_qwen2_vl, tiny_qwen3_vl
from illava.visualize import group_colors, overlay_groups

from .conftest import random_image, write_mp4

ROOT = Path(__file__).resolve().parents[1]
MERGING = [
    "--enable_illava_vit", "True", "--illava_vit_k", "1-2",
    "--enable_illava_llm", "True", "--illava_llm_k", "2", "--illava_llm_r", "0.5",
    "--illava_track_vit_source", "True", "--illava_track_llm_source", "True",
    "--max_new_tokens", "3",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for name, (model, processor) in {
        "ov": tiny_llava_onevision(image_size=56, vision_layers=4, text_layers=4),
        "qwen": tiny_qwen2_vl(vision_depth=4, text_layers=4),
        "qwen3": tiny_qwen3_vl(vision_depth=4, text_layers=4, deepstack_layers=(0, 2)),
        # Qwen3.5: full attention at decoder layer 3, Gated-DeltaNet elsewhere
        "qwen3_5": tiny_qwen3_vl(vision_depth=4, text_layers=8, qwen3_5=True, rotary_fraction=0.5),
    }.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    random_image(60, 90).save(root / "image.png")
    (root / "folder").mkdir()
    for index in range(3):
        random_image(50 + 10 * index, 80, seed=index).save(root / "folder" / f"{index}.jpg")
    (root / "empty").mkdir()
    write_mp4(root / "clip.mp4", frames=6, fps=4)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    (root / "empty.mp4").write_bytes(b"")
    return root


@pytest.mark.parametrize("model_name", ["ov", "qwen", "qwen3"])
@pytest.mark.parametrize("input_name, kind", [("image.png", "image"), ("folder", "images"), ("clip.mp4", "video")])
def test_end_to_end(workspace, capsys, model_name, input_name, kind):
    output_dir = workspace / f"out-{model_name}-{kind}"
    status = cli.main([
        "--model_path", str(workspace / model_name), "--input_path", str(workspace / input_name),
        "--question", "What-is-in_the-picture?", "--output_dir", str(output_dir), "--compare",
        "--max_frames_num", "4", *MERGING, "--illava_vit_r", {"ov": "3", "qwen": "1", "qwen3": "1"}[model_name],
    ])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"({kind})" in printed and "question: What is in the picture?" in printed
    assert "[baseline] answer:" in printed and "[illava] answer:" in printed
    assert "ViT " in printed and "LLM layer 2" in printed and "prefill" in printed and "peak memory" in printed
    files = sorted(path.name for path in output_dir.iterdir())
    assert any(name.startswith("attention_map_vit_layer_") for name in files)
    assert any(name.startswith("attention_map_llm_layer_") for name in files)


def test_qwen3_5_both_stages_end_to_end(workspace, capsys):
    """Detected from its config; the LLM stage merges at a linear-attention layer (4), scored by layer 3."""
    output_dir = workspace / "out-qwen3_5"
    merging = [value if previous != "--illava_llm_k" else "4" for previous, value in zip([None, *MERGING], MERGING)]
    status = cli.main(["--model_path", str(workspace / "qwen3_5"), "--input_path", str(workspace / "image.png"),
                       "--output_dir", str(output_dir), *merging, "--illava_vit_r", "1"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "LLM layer 4" in printed and "[illava] answer:" in printed
    assert any(path.name.startswith("attention_map_llm_layer_4") for path in output_dir.iterdir())


def test_every_merge_layer_keeps_its_own_heatmap(workspace, capsys):
    """r 0.07 leaves 16 -> 15 -> 14 -> 14 tokens per crop and r 0 merges nothing in the LLM: layers that leave the
    same count once wrote the same file, so that all but one heatmap were lost."""
    output_dir = workspace / "out-same-counts"
    status = cli.main([
        "--model_path", str(workspace / "ov"), "--input_path", str(workspace / "image.png"), "--output_dir",
        str(output_dir), "--max_new_tokens", "2", "--illava_track_vit_source", "True", "--illava_track_llm_source",
        "True", "--enable_illava_vit", "True", "--illava_vit_k", "1-2-3", "--illava_vit_r", "0.07",
        "--enable_illava_llm", "True", "--illava_llm_k", "2-3", "--illava_llm_r", "0",
    ])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "tokens 16 -> 15 -> 14 -> 14 (layers 1-2-3)" in printed
    paths = [Path(line.removeprefix("heatmap: ")) for line in printed.splitlines() if line.startswith("heatmap: ")]
    names = ["attention_map_vit_layer_1.jpg", "attention_map_vit_layer_2.jpg", "attention_map_vit_layer_3.jpg",
             "attention_map_llm_layer_2.jpg", "attention_map_llm_layer_3.jpg"]
    assert [path.name for path in paths] == names
    assert all(path.is_file() for path in paths)
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(names)


def test_video_without_pooling(workspace, capsys):
    status = cli.main(["--model_path", str(workspace / "ov"), "--input_path", str(workspace / "clip.mp4"),
                       "--max_frames_num", "3", "--mm_spatial_pool_stride", "1", "--max_new_tokens", "2",
                       "--enable_illava_vit", "True", "--illava_vit_k", "1", "--illava_vit_r", "7"])
    assert status == 0
    assert "LLM receives video tokens: [28]" in capsys.readouterr().out  # 3 frames x 9 unpooled tokens + newline


def test_wrapper_script_runs(workspace):
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_inference_once.py"), "--model_path", str(workspace / "ov"),
         "--input_path", str(workspace / "image.png"), "--enable_illava_vit", "False", "--max_new_tokens", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "[illava] answer:" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--input_path", "{root}/missing.png"], "does not exist"),
        (["--input_path", "{root}/empty"], "folder without images"),
        (["--input_path", "{root}/broken.mp4"], "cannot decode video"),
        (["--input_path", "{root}/image.png", "--illava_vit_r", "1.0"], "illava_vit_r=1.0"),
        (["--input_path", "{root}/image.png", "--enable_illava_vit", "sure"], "enable_illava_vit='sure'"),
        (["--input_path", "{root}/image.png", "--enable_illava_vit", "True", "--illava_vit_k", "1-9"],
         r"\[9\] beyond the vision encoder's 4 layers"),
        (["--input_path", "{root}/image.png", "--max_frames_num", "0"], "max_frames_num 0"),
        (["--input_path", "{root}/image.png", "--enable_illava_vit", "True", "--illava_vit_k=-1"],
         "illava_vit_k='-1'"),
        (["--input_path", "{root}/image.png", "--mm_spatial_pool_stride", "0"], "mm_spatial_pool_stride 0"),
        (["--input_path", "{root}/image.png", "--max_new_tokens", "0"], "max_new_tokens 0"),
        (["--input_path", "{root}/image.png", "--output_dir", "{root}/image.png"], "image.png' is a file"),
    ],
)
def test_bad_input_gives_a_clear_error(workspace, capsys, arguments, message):
    arguments = [argument.format(root=workspace) for argument in arguments]
    status = cli.main(["--model_path", str(workspace / "ov"), *arguments])
    assert status == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--device", "nonsense"], "--device 'nonsense' is not a device torch knows"),
        (["--device", "cuda:99"], "--device 'cuda:99': (no cuda device|only [0-9]+ cuda device)"),
        (["--device", "xla"], "--device 'xla': no xla device is available"),
        (["--attn_implementation", "flash_attention_2"], r"flash_attn package: pip install 'illava\[flash\]'"),
    ],
)
def test_bad_device_or_attention_is_one_line_before_loading(workspace, monkeypatch, capsys, arguments, message):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed, whatever this machine has
    monkeypatch.setattr(cli, "load_model", lambda args: pytest.fail("the model was loaded"))
    status = cli.main(["--input_path", str(workspace / "image.png"), *arguments])
    error = capsys.readouterr().err
    assert status == 2
    assert re.search(message, error) and error.count("\n") == 1


@pytest.mark.parametrize(
    "device, dtype, message",
    [
        ("cpu", "bfloat16", "runs on CUDA, not --device 'cpu'"),
        ("cuda", "float32", "runs in float16 or bfloat16, not --dtype float32"),
        ("cuda", "bfloat16", None),
    ],
)
def test_flash_attention_needs_cuda_and_half_precision(monkeypatch, device, dtype, message):
    installed = types.ModuleType("flash_attn")
    installed.__spec__ = importlib.machinery.ModuleSpec("flash_attn", loader=None)
    monkeypatch.setitem(sys.modules, "flash_attn", installed)  # as if flash_attn were installed
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # and a GPU were here
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    if message is None:
        cli.check_device_and_attention(device, "flash_attention_2", dtype)
    else:
        with pytest.raises(cli.CliError, match=re.escape(message)):
            cli.check_device_and_attention(device, "flash_attention_2", dtype)


def test_unknown_attention_implementation_is_an_argparse_error(workspace, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--input_path", str(workspace / "image.png"), "--attn_implementation", "magic"])
    assert exit_info.value.code == 2 and "'magic'" in capsys.readouterr().err


@pytest.mark.parametrize("decoder", ["decord", "av"])
@pytest.mark.parametrize("name", ["broken.mp4", "empty.mp4"])
def test_an_unreadable_video_is_named_by_either_decoder(workspace, monkeypatch, decoder, name):
    pytest.importorskip(decoder)
    if decoder == "av":
        monkeypatch.setitem(sys.modules, "decord", None)  # what a machine without decord does
    with pytest.raises(cli.CliError, match=f"cannot decode video .*{name}|video .*{name}.* has no frames"):
        cli.load_video(workspace / name, max_frames=4)


def test_unknown_flag_exits_nonzero(workspace):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--input_path", str(workspace / "image.png"), "--illava_vit_rr", "3"])
    assert exit_info.value.code != 0


def test_question_words_joined_by_dashes_or_underscores():
    assert cli.question_text("What-is_this?") == "What is this?"
    assert cli.question_text("Is it a well-known place?") == "Is it a well-known place?"


def test_heatmap_colours_follow_the_merge_groups():
    groups = np.array([[0, 0, 1], [2, 1, 1], [-1, 2, 2]])
    image = np.full((30, 30, 3), 128, dtype=np.uint8)
    rendered = overlay_groups(image, groups).astype(int)
    cells = {}
    for row in range(3):
        for col in range(3):
            cell = rendered[row * 10 + 3 : row * 10 + 7, col * 10 + 3 : col * 10 + 7]  # inside, away from borders
            assert (cell == cell[0, 0]).all()  # one colour per patch
            cells.setdefault(int(groups[row, col]), set()).add(tuple(cell[0, 0]))
    assert all(len(colours) == 1 for colours in cells.values())  # every patch of a group has the same colour
    assert len({next(iter(colours)) for colours in cells.values()}) == len(cells)  # different groups differ
    # borders are drawn only between different groups
    assert (rendered[5, 20] < rendered[5, 25]).all()  # the first column of group 1's patch, next to group 0
    assert (rendered[5, 0:20] == rendered[5, 5]).all()  # no border inside group 0's two patches
    assert len({tuple(np.round(color, 3)) for color in group_colors(np.arange(200))}) == 200


def test_qwen3_vl_video_frames_are_stamped_with_their_time_in_the_video(workspace):
    """clip.mp4: 6 frames at 4 fps; 4 sampled = frames 0, 2, 3, 5, grouped in twos (temporal patch 2)."""
    model, processor, _ = cli.load_model(cli.build_parser().parse_args(
        ["--model_path", str(workspace / "qwen3"), "--input_path", "unused"]))
    visual = cli.load_visual(str(workspace / "clip.mp4"), max_frames=4)
    assert visual.timing.frame_indices == [0, 2, 3, 5] and visual.timing.fps == 4.0
    inputs = cli.build_inputs(model, processor, visual, "what happens", "cpu", model.dtype)
    prompt = processor.tokenizer.decode(inputs["input_ids"][0])
    assert "<0.2 seconds>" in prompt and "<1.0 seconds>" in prompt  # (0+2)/2/4 s and (3+5)/2/4 s
