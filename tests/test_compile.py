"""torch.compile of a patched model (what users do for speed): the compiled model merges as the eager one does,
on every family, and after `remove` it computes what the unpatched model computes. Dynamo's tracing is what the
patches must survive (graph breaks around hooks, data-dependent merges), so the fast `eager` backend is used; the
benchmark measures inductor."""

import pytest
import torch
import transformers

import illava

from .families import FAMILIES


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# one way per family (tracing a model takes 5-20 s on CPU); both ways among the packed-block families
COMPILE_WAYS = {"llava_onevision": "torch.compile", "qwen2_vl": "model.compile", "qwen3_vl": "torch.compile",
                "siglip2": "model.compile", "llava_vit": "model.compile", "aimv2": "torch.compile"}


def unpatched_compiled(family, model, call):
    """The unpatched model's compiled output; a skip where this torch and transformers do not compile it
    (transformers 5.20 compiles neither its VLMs nor SigLIP2 on torch 2.6): illava must not break what compiles
    without it."""
    try:
        return call(torch.compile(model, backend="eager"), 1)
    except Exception:  # noqa: BLE001 - whatever stops the unpatched model's compile
        pytest.skip(f"torch {torch.__version__} / transformers {transformers.__version__} do not compile {family}")
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family, how", sorted(COMPILE_WAYS.items()))
def test_a_compiled_patched_model_merges_as_the_eager_one(family, how):
    model, processor, call, settings, *_ = FAMILIES[family]()
    unpatched = unpatched_compiled(family, model, call)
    illava.apply(model, processor=processor, **settings)
    merged = call(model, 1)
    counts = [entry.tokens_per_group for entry in illava.last_trace(model).vision]
    assert counts[0][-1] < counts[0][0]
    if how == "model.compile":
        model.compile(backend="eager")
        compiled = model
    else:
        compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(call(compiled, 1), merged, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert [entry.tokens_per_group for entry in illava.last_trace(model).vision] == counts
    illava.remove(model)
    torch.testing.assert_close(call(compiled, 1), unpatched, rtol=1e-5, atol=1e-5)
