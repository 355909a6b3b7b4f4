"""The peer methods of benchmarks/accuracy_retention.py: budgets and selections, on small tensors."""

import numpy as np
import torch

from benchmarks import accuracy_retention as benchmark


def test_visionzip_keeps_the_dominant_tokens_in_order_and_averages_the_rest_into_contexts():
    crops, count, dim = 2, 16, 3
    features = torch.randn(crops, count, dim)
    received = torch.rand(crops, count)
    keys = torch.randn(crops, count, 4)
    out = benchmark.visionzip_select(features, received, keys, tokens=8)
    dominant, contextual = benchmark.visionzip_split(8)
    assert (dominant, contextual) == (7, 1) and out.shape == (crops, 8, dim)
    for crop in range(crops):
        top = received[crop].topk(dominant).indices.sort().values
        torch.testing.assert_close(out[crop, :dominant], features[crop, top])
        rest = [index for index in range(count) if index not in set(top.tolist())]
        torch.testing.assert_close(out[crop, dominant], features[crop, rest].mean(dim=0))  # one context: all the rest


def test_visionzip_contexts_group_the_rest_by_key_similarity():
    features = torch.arange(32, dtype=torch.float32).view(1, 32, 1)
    received = torch.zeros(1, 32)
    received[0, :10] = torch.linspace(2, 1, 10)  # tokens 0-9 dominate
    keys = torch.zeros(1, 32, 2)
    keys[0, 10:18, 0] = 1  # the rest in two clusters: tokens 10-17 and 18-31; the centres are tokens 10 and 31
    keys[0, 18:, 1] = 1
    assert benchmark.visionzip_split(12) == (10, 2)
    out = benchmark.visionzip_select(features, received, keys, tokens=12)
    assert out[0, :, 0].tolist() == [*range(10), sum(range(10, 18)) / 8, sum(range(18, 32)) / 14]


def test_fastv_is_the_llm_stage_dropping_at_layer_two():
    options = benchmark.settings_for("fastv", 7, 14, (2, 3, 4), (5,))
    assert options["illava_llm_k"] == "2" and options["illava_llm_mode"] == "drop"
    assert "enable_illava_vit" not in options
    pivot = benchmark.settings_for("vit:pivot", 7, 14, (2, 3, 4), (2,))
    assert pivot["illava_vit_mode"] == "pivot" and pivot["illava_vit_r"] == (196 - 49) // 3


def test_video_budgets_reach_the_same_llm_tokens_by_every_route():
    assert benchmark.valid_frame_tokens(14, 3)[:3] == [49, 46, 43]
    assert {25, 16, 4} <= set(benchmark.valid_frame_tokens(14, 3)) and 9 not in benchmark.valid_frame_tokens(14, 3)
    vit = benchmark.video_settings_for("vit", 16, 8, 14, (2, 3, 4), (2,))
    assert vit["illava_vit_r"] == (196 - 64) // 3  # 64 survivors per frame pool 2x2 to 16
    llm = benchmark.video_settings_for("llm:pivot", 16, 8, 14, (2, 3, 4), (2,))
    assert int(llm["illava_llm_r"] * 393) == 8 * 16 + 1 and llm["illava_llm_mode"] == "pivot"
    both = benchmark.video_settings_for("both", 4, 8, 14, (2, 3, 4), (2,))
    survivors = 196 - 3 * both["illava_vit_r"]
    assert survivors % 4 == 0 and int(both["illava_llm_r"] * (8 * survivors // 4 + 1)) == 8 * 4 + 1
    assert benchmark.video_settings_for("visionzip", 4, 8, 14, (2, 3, 4), (2,)) == {}


def test_frame_reductions_hand_the_llm_the_budget():
    """Every peer and the ViT stage give the LLM `frames * t + 1` visual tokens for one video, and the model runs."""
    import illava
    from illava.tools.default_model import load_default_model
    from training.scenes import sample_video

    model, processor = load_default_model()
    item = sample_video("test", 0, frames=4)
    video = [np.stack([np.asarray(frame) for frame in item.frames])]
    prompt = benchmark.video_prompt(processor, item.question)

    def visual_tokens() -> int:
        inputs = processor(videos=video, text=[prompt], return_tensors="pt")
        with torch.no_grad():
            model(**inputs)
        return int((inputs["input_ids"] == model.config.video_token_id).sum())

    assert visual_tokens() == 4 * 49 + 1
    for method in ("random", "pool", "visionzip"):
        with benchmark.peer_reduction(model, processor, "video", method, 16, seed=0):
            assert visual_tokens() == 4 * 16 + 1, method
    assert visual_tokens() == 4 * 49 + 1  # the patches are gone
    with illava.applied(model, benchmark.video_settings_for("vit", 16, 4, 14, (2, 3, 4), (2,)), processor=processor):
        assert visual_tokens() == 4 * 16 + 1
