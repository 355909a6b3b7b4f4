"""What a careless or hostile caller does to a patched model and its processor: each either works as documented
or fails with an error naming the problem; nothing leaves bad state behind. (What every family keeps alike:
copies, pickling, applying twice, remove, bad settings: `test_contract.py`.)"""

import copy

import pytest
import torch
from transformers import AutoProcessor

import illava
from illava.tools.tiny_models import tiny_llava_onevision, tiny_qwen2_vl

from .conftest import logits_of, random_image

OV_VIT = dict(enable_illava_vit=True, illava_vit_k="1-2", illava_vit_r=3)
QWEN_VIT = dict(enable_illava_vit=True, illava_vit_k="2-3", illava_vit_r=3)


@pytest.fixture(scope="module")
def ov():
    return tiny_llava_onevision(image_size=56, vision_layers=6)


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_vl()


def ov_prompt(processor, image):
    return processor(images=[[image]], text="<image>describe", return_tensors="pt")


# -- processors --------------------------------------------------------------------------------------------


def test_a_processor_saved_while_applied_is_the_original(ov, tmp_path):
    model, processor = ov
    image = random_image(40, 90)
    baseline = logits_of(model, ov_prompt(processor, image))
    with illava.applied(model, processor=processor, **OV_VIT):
        processor.save_pretrained(tmp_path)
        assert processor.num_image_tokens < 16  # still patched after saving
        assert processor.to_dict()["num_image_tokens"] == 16  # what printing and saving read
    saved = AutoProcessor.from_pretrained(tmp_path)
    assert saved.num_image_tokens == 16
    assert torch.equal(logits_of(model, ov_prompt(saved, image)), baseline)  # the clean model accepts its prompts


def test_a_processor_serves_one_patched_model_at_a_time(qwen):
    model, processor = qwen
    other, _ = tiny_qwen2_vl(seed=1)
    with illava.applied(model, processor=processor, **QWEN_VIT):
        with pytest.raises(RuntimeError, match="already patched by illava.apply for another model"):
            illava.apply(other, processor=processor, **QWEN_VIT)
        assert not illava.is_applied(other)
        assert "replace_image_token" in vars(processor)  # the failed apply left the first patch in place
    assert "replace_image_token" not in vars(processor) and "_illava_patched_for" not in vars(processor)
    # two models with a processor each, removed in either order: nothing stays patched
    second_processor = copy.deepcopy(processor)
    illava.apply(model, processor=processor, **QWEN_VIT)
    illava.apply(other, processor=second_processor, **QWEN_VIT)
    illava.remove(model)
    illava.remove(other)
    for each in (processor, second_processor):
        assert not vars(each).keys() & {"replace_image_token", "replace_video_token", "save_pretrained"}


def test_the_wrong_processor_for_the_model_is_named(ov, qwen):
    (ov_model, ov_processor), (qwen_model, qwen_processor) = ov, qwen
    with pytest.raises(ValueError, match=r"Qwen2VLProcessor\) does not belong to this model \(Llava"):
        illava.apply(ov_model, processor=qwen_processor, **OV_VIT)
    with pytest.raises(ValueError, match=r"LlavaOnevisionProcessor\) does not belong to this model \(Qwen2VL"):
        illava.apply(qwen_model, processor=ov_processor, **QWEN_VIT)
    assert not illava.is_applied(ov_model) and not illava.is_applied(qwen_model)
    assert ov_processor.num_image_tokens == 16 and "_illava_patched_for" not in vars(ov_processor)


# -- saving, unsupported models ----------------------------------------------------------------------------


def test_save_pretrained_while_applied_saves_the_weights(ov, tmp_path):
    """(Deep copies, shallow copies and pickling of a patched model: `test_contract.py`, on every family.)"""
    model, processor = ov
    with illava.applied(model, processor=processor, **OV_VIT):
        model.save_pretrained(tmp_path)  # the weights, unchanged by merging
    reloaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_an_unsupported_model_is_named():
    with pytest.raises(TypeError, match="does not support Linear"):
        illava.apply(torch.nn.Linear(2, 2), enable_illava_vit=True)


# -- prompt_ends ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [0, -3, 2.5, "7", [], [4, 0], True])
def test_prompt_ends_refuses_what_is_not_a_positive_length(ov, lengths):
    model, processor = ov
    with illava.applied(model, processor=processor, enable_illava_llm=True, illava_llm_k="2", illava_llm_r=0.5):
        with pytest.raises(ValueError, match="not a positive token count"):
            with illava.prompt_ends(model, lengths):
                pass


def test_prompt_ends_that_do_not_fit_the_input_are_named(ov):
    model, processor = ov
    inputs = ov_prompt(processor, random_image(40, 90))
    length = inputs["input_ids"].shape[1]
    last_visual = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero().max())
    with illava.applied(model, processor=processor, enable_illava_llm=True, illava_llm_k="2", illava_llm_r=0.5):
        inputs = ov_prompt(processor, random_image(40, 90))
        for lengths, message in ((length + 1, "within its"), (last_visual, "after the row's last image/video token"),
                                 ([length, length], "2 prompt lengths for a batch of 1")):
            with illava.prompt_ends(model, lengths), pytest.raises(ValueError, match=message):
                logits_of(model, inputs)
        with illava.prompt_ends(model, torch.tensor([length])):  # a tensor with one length per row, as lmms-eval's
            assert logits_of(model, inputs).shape[1] == inputs["input_ids"].shape[1]
