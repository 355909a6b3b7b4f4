"""Benchmark bookkeeping: FLOPs formulas on known small cases and token counts from the trace (no timings)."""

import json
import sys

import pytest
import torch

from illava import IllavaConfig
from illava.tools import bench, measure
from illava.tools.tiny_models import tiny_llava_onevision


def siglip_layer_flops(attended: int, kept: int, groups: int, width: int, mlp: int) -> float:
    """One SigLIP layer by hand: q/k/v/o and attention over the `attended` tokens of each group, the MLP over the
    `kept` ones (a merge layer merges between the two)."""
    return 2.0 * groups * (attended * 4 * width * width + 2 * attended * attended * width + kept * 2 * width * mlp)


def test_attention_pairs_follow_the_segments():
    hidden = torch.zeros(10, 4)
    assert int(bench.attention_pairs(hidden, torch.tensor([0, 3, 10]))) == 9 + 49
    assert bench.attention_pairs(hidden, None) == 100
    assert bench.attention_pairs(torch.zeros(3, 5, 4), None) == 75


def test_llm_prefill_flops_by_hand():
    # 2 tokens, width 4, MLP 8, kv width 2: projections 2*(2*16 + 2*8 + 3*32) = 288; causal pairs 3 -> 2*3*4 = 24
    assert bench.llm_prefill_flops(2, 4, 8, 2) == 2.0 * (288 + 24)
    assert bench.llm_prefill_flops(1, 4, 8, 2, context=5) == 2.0 * (144 + 2 * 5 * 4)


def test_scaled_geometry_keeps_head_dim_and_depth():
    scaled = bench._scaled(bench.QWEN2_TEXT["7b"], 8)
    assert scaled["hidden_size"] // scaled["num_attention_heads"] == 128
    assert scaled["num_hidden_layers"] == 28 and scaled["num_attention_heads"] % scaled["num_key_value_heads"] == 0


def test_suite_counts_tokens_and_flops_from_the_trace():
    model, processor = tiny_llava_onevision(image_size=56, vision_layers=4, text_layers=4)
    settings = {
        "baseline": {},
        "both": dict(enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=3,
                     enable_illava_llm=True, illava_llm_k="2", illava_llm_r=0.5),
    }
    build = bench._inputs_builder(model, processor, "llava_onevision", 100, None, "cpu", model.dtype)
    rows = bench.run_suite(model, processor, "llava_onevision", settings, build, [1, 2], 1, 3, "cpu")
    assert [(row["setting"], row["batch"]) for row in rows] == [("baseline", 1), ("both", 1), ("baseline", 2), ("both", 2)]
    base, merged = rows[0], rows[1]
    assert merged["visual_tokens"]["vit_per_group"] == [16, 13, 10]
    assert base["visual_tokens"]["vit_groups"] == merged["visual_tokens"]["vit_groups"] == 5  # base + 2x2 crops
    sequence = merged["visual_tokens"]["llm_sequence"]
    assert len(sequence) == 2 and sequence[1] < sequence[0] < base["visual_tokens"]["llm_sequence"][0]
    vision, text = model.config.vision_config, model.config.text_config
    width, mlp = vision.hidden_size, vision.intermediate_size
    patch_embedding = 2.0 * 5 * 16 * width * 3 * 14 * 14  # a 14x14 conv into `width` channels, 5 crops of 4x4
    # 4 layers, merges inside layers 1 and 2 (between attention and MLP): 16 -> 13 -> 10 tokens per crop
    merged_vision = patch_embedding + sum(siglip_layer_flops(attended, kept, 5, width, mlp) for attended, kept in
                                          [(16, 16), (16, 13), (13, 10), (10, 10)])
    assert merged["flops"]["vision"] == pytest.approx(merged_vision)
    assert base["flops"]["vision"] == pytest.approx(patch_embedding + 4 * siglip_layer_flops(16, 16, 5, width, mlp))
    head = 2.0 * text.vocab_size * text.hidden_size  # on the last position
    expected = bench.prefill_flops(model, IllavaConfig(**settings["both"]), sequence,
                                   {"vision": merged_vision, "llm_prefill": head})
    assert merged["flops"] == pytest.approx(expected)
    batched = bench.prefill_flops(model, IllavaConfig(**settings["both"]), sequence,
                                  {"vision": 2 * merged_vision, "llm_prefill": 2 * head}, sequences=2)
    assert rows[3]["flops"] == pytest.approx(batched)
    assert batched["llm_prefill"] == pytest.approx(2 * expected["llm_prefill"])
    assert merged["flops_predicted_speedup"] == pytest.approx(base["flops"]["total"] / expected["total"])
    assert merged["flops_predicted_speedup"] > 1 and base["flops_predicted_speedup"] == 1
    assert "| both | 2 |" in bench.markdown_table(rows)


def test_video_sweep_reports_frames_and_budget(monkeypatch):
    model, processor = tiny_llava_onevision(image_size=56, vision_layers=4, text_layers=4)
    monkeypatch.setitem(bench.VIDEO_SETTINGS, "video (paper)", dict(  # 16 -> 12 tokens per frame, pooled 4 -> 3
        enable_illava_vit=True, illava_vit_k="1", illava_vit_r=4, enable_illava_llm=True, illava_llm_k="2",
        illava_llm_r=0.7))
    rows, largest = bench.video_sweep(model, processor, [2, 3], 10**12, 1, "cpu", model.dtype)
    assert [(row["setting"], row["frames"]) for row in rows] == [
        ("baseline", 2), ("video (paper)", 2), ("baseline", 3), ("video (paper)", 3)]
    assert rows[1]["visual_tokens"]["llm_visual_input"] < rows[0]["visual_tokens"]["llm_visual_input"]
    assert largest == {"baseline": 3, "video (paper)": 3}
    batched, _ = bench.video_sweep(model, processor, [2], None, 1, "cpu", model.dtype, batches=[2])
    assert [(row["batch"], row["frames"]) for row in batched] == [(2, 2), (2, 2)]
    assert batched[1]["visual_tokens"]["llm_visual_input"] == 2 * rows[1]["visual_tokens"]["llm_visual_input"]
    _, nothing_fits = bench.video_sweep(model, processor, [2], 0, 1, "cpu", model.dtype)
    assert nothing_fits == {"baseline": None, "video (paper)": None}


def test_every_geometry_builds_and_its_settings_fit_its_depths():
    import illava

    for geometry, (family, *_) in bench.GEOMETRIES.items():
        model, _, built_family = bench.build_model(geometry, "meta", torch.float32, "sdpa")
        assert built_family == family
        for name, options in bench.SETTINGS[family].items():
            if options:
                illava.apply(model, IllavaConfig(**options))  # validates the layers against the model's depths
                illava.remove(model)


def test_qwen3_vl_geometry_runs_the_reference_settings():
    model, processor, family = bench.build_model("qwen3-vl-2b-cpu", "cpu", torch.float32, "sdpa")
    assert len(model.model.visual.blocks) == 24 and model.config.text_config.num_hidden_layers == 28
    build = bench._inputs_builder(model, processor, family, 128, None, "cpu", torch.float32)  # 8x8 patches
    rows = {row["setting"]: row for row in bench.run_suite(model, processor, family, bench.SETTINGS[family], build,
                                                           [1], 1, 2, "cpu")}
    assert rows["baseline"]["visual_tokens"]["llm_visual_input"] == 16
    assert rows["vit 5-8 r.10"]["visual_tokens"]["vit_per_group"] == [64, 60, 56, 52, 48]  # in 2x2 windows
    both = rows["both (VLMEvalKit, pivot)"]["visual_tokens"]
    assert both["llm_visual_input"] < 16 and len(both["llm_sequence"]) == 5
    assert both["llm_sequence"] == sorted(both["llm_sequence"], reverse=True)
    # the packed merge (called by name inside the Qwen tower) is timed; nothing is for the baseline
    assert rows["vit 5-8 r.10"]["merge_s"] > 0 and rows["baseline"]["merge_s"] == 0
    assert rows["baseline"]["ratio_samples_per_s"] == 1


def test_qwen3_5_geometry_counts_its_linear_attention_layers():
    model, processor, family = bench.build_model("qwen3.5-cpu", "cpu", torch.float32, "sdpa")
    text = model.config.text_config
    assert text.layer_types.count("full_attention") == 8 and text.linear_num_value_heads == 4
    build = bench._inputs_builder(model, processor, family, 64, None, "cpu", torch.float32)
    rows = {row["setting"]: row for row in bench.run_suite(model, processor, family, bench.SETTINGS[family], build,
                                                           [1], 1, 2, "cpu")}
    assert rows["llm 16-20-24 keep .85"]["visual_tokens"]["llm_sequence"][0] > rows["llm 16-20-24 keep .85"][
        "visual_tokens"]["llm_sequence"][-1]
    linear = bench.gated_delta_net_flops(10, text.hidden_size, text.intermediate_size, text)
    key_dim, value_dim = 2 * 128, 4 * 128
    by_hand = 2 * 10 * (512 * (2 * key_dim + 2 * value_dim + 2 * 4) + value_dim * 512 + 4 * 4 * 128 * 128
                        + 3 * 512 * 1536)
    assert linear == by_hand
    full = bench.llm_prefill_flops(10, 512, 1536, 256, gated=True)
    assert full == 2 * (10 * (3 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1536) + 2 * 55 * 512)
    expected = sum((full if kind == "full_attention" else linear) for kind in text.layer_types)
    counted = {"vision": 0.0, "llm_prefill": 0.0}
    assert bench.prefill_flops(model, IllavaConfig(), [10], counted)["llm_prefill"] == pytest.approx(expected)


def test_compile_runs_the_image_settings_again_labelled(monkeypatch, tmp_path):
    compiled = []
    monkeypatch.setattr(bench, "compile_in_place", compiled.append)
    monkeypatch.setitem(bench.GEOMETRIES, "tiny-qwen3", ("qwen3_vl", dict(bench.QWEN3_VIT["2b"], depth=9, deepstack_visual_indexes=[2, 4, 8]),
                                                        dict(bench.QWEN3_TEXT["2b"], num_hidden_layers=26), 16))
    bench.main(["--geometry", "tiny-qwen3", "--image-size", "64", "--repeats", "1", "--new-tokens", "2",
                "--compile", "--output_dir", str(tmp_path)])
    assert len(compiled) == 1
    rows = json.loads((tmp_path / "bench-tiny-qwen3-cpu-float32-sdpa-compiled.json").read_text())["rows"]
    names = [row["setting"] for row in rows]
    assert names == list(bench.SETTINGS["qwen3_vl"]) + [name + " (compiled)" for name in bench.SETTINGS["qwen3_vl"]]
    assert rows[len(names) // 2]["ratio_prefill"] == 1  # the compiled runs' own baseline


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--batches", "0"], "argument --batches: '0': '0' must be at least 1"),
        (["--batches", "a,b"], "argument --batches: 'a,b': 'a' is not an integer"),
        (["--batches", "1,,4"], "argument --batches: '1,,4': '' is not an integer"),
        (["--repeats", "0"], "argument --repeats: '0' must be at least 1"),
        (["--new-tokens", "-3"], "argument --new-tokens: '-3' must be at least 1"),
        (["--image-size", "0"], "argument --image-size: '0' must be at least 1"),
        (["--image-size", "big"], "argument --image-size: 'big' is not an integer"),
        (["--video-frames", "0"], "argument --video-frames: '0': '0' must be at least 1"),
        (["--video-frames", "8", "--memory-budget-gib", "-1"], "argument --memory-budget-gib: '-1' must be a finite"),
        (["--video-frames", "8", "--memory-budget-gib", "nan"], "argument --memory-budget-gib: 'nan' must be a finite"),
        (["--memory-budget-gib", "4"], "--memory-budget-gib applies to the video sweep"),
        (["--video-batches", "4"], "--video-batches applies to the video sweep"),
        (["--geometry", "qwen2-vl-7b-cpu", "--video-frames", "8"], "LLaVA-OneVision geometry, not 'qwen2-vl-7b-cpu'"),
        (["--device", "nonsense"], "--device 'nonsense' is not a device torch knows"),
        (["--device", "cuda:99"], "--device 'cuda:99'"),
        (["--attn", "flash_attention_2"], "pip install 'illava[flash]'"),
    ],
)
def test_bad_arguments_are_refused_before_a_model_is_built(monkeypatch, capsys, arguments, message):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed, whatever this machine has
    monkeypatch.setattr(bench, "build_model", lambda *args: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_device_with_an_index_is_synchronised(monkeypatch):
    synchronised = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synchronised.append(True))
    measure.synchronize("cuda:1")
    measure.synchronize("cpu")
    assert synchronised == [True]


def test_peak_memory_on_cpu_is_the_peak_of_live_tensors():
    kept = torch.ones(4 * 2**20)  # allocated before: its free lowers the level
    with measure.PeakMemory("cpu") as peak:
        first = torch.ones(2**20)  # 4 MiB
        second = torch.ones(2 * 2**20)  # 8 MiB: 12 live
        del first, kept
        third = torch.ones(2**20)  # 4 MiB: 12 - 16 + 4
        del second, third
    assert abs(peak.bytes - 12 * 2**20) < 2**16


def test_stage_fractions_follow_each_stage_and_skip_an_unchanged_one():
    base = {"flops": {"vision": 100.0, "llm_prefill": 200.0}}
    llm_only = {"stage_speedups": {"vision": 2 / 2.1, "llm": 4 / 3}, "flops": {"vision": 100.0, "llm_prefill": 125.0}}
    fractions = bench.stage_fractions(llm_only, base)
    assert fractions["fraction_of_vision_limit"] is None
    assert fractions["fraction_of_llm_limit"] == pytest.approx((4 / 3 - 1) / (200 / 125 - 1))


def test_ratios_pair_each_round_with_its_own_baseline(monkeypatch):
    """The machine slows down after the first round: the fastest times of the two settings come from different
    rounds and their ratio (2.0 / 1.3) is not the speed-up every paired round measures (2.0)."""
    rounds = iter([("baseline", 2.0), ("merged", 1.3),  # warm-up
                   ("baseline", 2.0), ("merged", 1.3), ("baseline", 3.0), ("merged", 1.5), ("baseline", 3.0),
                   ("merged", 1.5), ("baseline", 9.9), ("merged", 9.9)])  # the last pair: the memory runs

    def measure_once(model, processor, family, build_inputs, config, batch, new_tokens, device, memory=False):
        name, seconds = next(rounds)
        assert (config is None) == (name == "baseline")
        flops = 2.0 if name == "baseline" else 1.0  # a FLOPs limit of 2x
        return bench.Measurement(setting="", batch=batch, visual_tokens={}, flops={"vision": flops, "llm_prefill": flops,
                                 "total": 2 * flops}, vision_s=seconds / 2, prefill_s=seconds / 2,
                                 decode_tokens_per_s=1.0, end_to_end_s=seconds, merge_s=0.0, peak_bytes=1)

    monkeypatch.setattr(bench, "measure_once", measure_once)
    settings = {"baseline": {}, "merged": dict(enable_illava_vit=True, illava_vit_k="1", illava_vit_r=1)}
    base, merged = bench.run_suite(None, None, "qwen3_vl", settings, None, [1], 3, 2, "cpu")
    assert merged["vision_s"] + merged["prefill_s"] == 1.3  # the fastest round is shown
    assert merged["ratio_prefill"] == pytest.approx(2.0) and merged["ratio_end_to_end"] == pytest.approx(2.0)
    assert merged["stage_speedups"] == pytest.approx({"vision": 2.0, "llm": 2.0})
    assert base["ratio_prefill"] == 1.0 and len(merged["rounds"]) == 3
    assert merged["fraction_of_flops_limit"] == pytest.approx(1.0)
    low, high = merged["fraction_of_flops_limit_quartiles"]  # the middle half of the rounds' (0.54, 1, 1)
    assert low < 1.0 and high == pytest.approx(1.0)


def test_qwen2_5_vl_vision_flops_count_its_windows_and_its_swiglu():
    from illava.tools.tiny_models import tiny_qwen2_vl

    model, processor = tiny_qwen2_vl(model_class="Qwen2_5_VLForConditionalGeneration")
    vision = model.config.vision_config  # 6 blocks, whole-image attention in blocks 2 and 5, 4x4-patch windows
    inputs = bench._inputs_builder(model, processor, "qwen2_vl", 112, None, "cpu", model.dtype)(1)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # 64 patches: 4 windows of 16
    with torch.no_grad(), bench.counted_flops(model) as counted:
        model(**inputs)
    width, mlp, patches = vision.hidden_size, vision.intermediate_size, 64
    patch_embedding = 2.0 * patches * width * 3 * 2 * 14 * 14
    projections = 2.0 * patches * (4 * width * width + 3 * width * mlp)  # qkv, proj; gate, up, down
    pairs = 2 * patches**2 + 4 * (4 * 16**2)
    merger = 2.0 * patches // 4 * (4 * width * 4 * width + 4 * width * vision.out_hidden_size)
    assert counted["vision"] == pytest.approx(patch_embedding + 6 * projections + 4.0 * pairs * width + merger)
