"""Threads (a web server's workers, an eval harness's thread pool) calling one patched model at once: every call
gets the result it gets alone, and each thread's `last_trace` is that of its own last call."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import illava
from illava.tools.tiny_models import tiny_qwen2_vl

from .conftest import random_image
from .families import BOTH_STAGES, FAMILIES, QWEN_PROMPT

CALLS, THREADS = 12, 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_concurrent_calls_equal_calls_alone(family):
    model, processor, call, settings, *_ = FAMILIES[family]()
    with illava.applied(model, processor=processor, **settings):
        def in_thread(seed):
            output = call(model, seed)
            return output, [entry.tokens_per_group for entry in illava.last_trace(model).vision]

        alone = {seed: in_thread(seed) for seed in range(CALLS)}
        with ThreadPoolExecutor(THREADS) as pool:
            together = dict(zip(range(CALLS), pool.map(in_thread, range(CALLS))))
    for seed in range(CALLS):
        (expected, expected_counts), (output, counts) = alone[seed], together[seed]
        assert counts == expected_counts, seed
        assert expected_counts[0][-1] < expected_counts[0][0]  # it merged
        torch.testing.assert_close(output, expected, rtol=0, atol=0, equal_nan=True)


def test_concurrent_generate_equals_generate_alone():
    model, processor = tiny_qwen2_vl()

    def generate(seed):
        inputs = processor(images=[random_image(56 + 14 * (seed % 3), 84, seed=seed)], text=QWEN_PROMPT + "!" * seed,
                           return_tensors="pt")
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=4, do_sample=False)

    with illava.applied(model, processor=processor, **BOTH_STAGES):
        alone = [generate(seed) for seed in range(6)]
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(generate, range(6)))
    for expected, tokens in zip(alone, together):
        assert torch.equal(tokens, expected)
