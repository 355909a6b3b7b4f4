"""The peer methods of benchmarks/accuracy_retention.py: budgets and selections, on small tensors."""

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
