import numpy as np
import pytest
import torch

from illava import IllavaConfig


def test_defaults_are_the_paper_image_setting_with_stages_off():
    config = IllavaConfig()
    assert (config.enable_illava_vit, config.enable_illava_llm) == (False, False)
    assert config.illava_vit_k == (5, 6, 7, 8) and config.illava_vit_r == 92
    assert config.illava_llm_k == (8,) and config.illava_llm_r == 0.70


@pytest.mark.parametrize(
    "value, expected",
    [("5-6-7-8", (5, 6, 7, 8)), ("8", (8,)), (8, (8,)), ([7, 5], (5, 7)), ("5,6", (5, 6)), ((3, 4), (3, 4)),
     ("5, 6", (5, 6)), ("[5-6]", (5, 6)), (" 5 6 ", (5, 6)), ("5 - 6", (5, 6))],
)
def test_layer_lists_parse(value, expected):
    assert IllavaConfig(illava_vit_k=value).illava_vit_k == expected
    assert IllavaConfig(illava_llm_k=value).illava_llm_k == expected


@pytest.mark.parametrize(
    "value, expected", [("True", True), ("false", False), (1, True), ("0", False), (True, True), ("yes", True)]
)
def test_booleans_parse_from_strings(value, expected):
    config = IllavaConfig(enable_illava_vit=value, illava_track_vit_source=value)
    assert config.enable_illava_vit is expected and config.illava_track_vit_source is expected


@pytest.mark.parametrize("value, expected", [("92", 92), (92, 92), ("0.16", 0.16), (0.7, 0.7), (0, 0)])
def test_r_parses_ints_and_ratios(value, expected):
    config = IllavaConfig(illava_vit_r=value, illava_llm_r=value)
    assert config.illava_vit_r == expected and type(config.illava_vit_r) is type(expected)
    assert config.illava_llm_r == expected


def test_numbers_from_numpy_and_torch_as_sweeps_produce_them():
    config = IllavaConfig(enable_illava_vit=np.bool_(True), illava_vit_k=np.int64(2), illava_vit_r=np.int64(3),
                          enable_illava_llm=True, illava_llm_k=np.arange(2, 4), illava_llm_r=np.float32(0.5),
                          illava_vit_mode=np.int64(3))
    assert (config.enable_illava_vit, config.illava_vit_k, config.illava_vit_r) == (True, (2,), 3)
    assert type(config.illava_vit_r) is int and config.illava_vit_k == (2,) and type(config.illava_vit_k[0]) is int
    assert config.illava_llm_k == (2, 3) and config.illava_llm_r == 0.5 and config.illava_vit_mode == "pivot"
    assert IllavaConfig(illava_vit_k=torch.tensor([5, 6]), illava_vit_r=torch.tensor(0.25)).illava_vit_k == (5, 6)
    with pytest.raises(ValueError, match="negative"):
        IllavaConfig(illava_vit_r=np.int64(-2))


def test_keyword_dict_as_lmms_eval_passes_it():
    model_args = {
        "pretrained": "x",
        "enable_illava_vit": True,
        "illava_vit_k": "5-6-7-8",
        "illava_vit_r": 92,
        "enable_illava_llm": "True",
        "illava_llm_k": 8,
        "illava_llm_r": 0.7,
    }
    config = IllavaConfig.pop_from(model_args)
    assert model_args == {"pretrained": "x"}
    assert config.enable_illava_llm is True and config.illava_llm_k == (8,)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"illava_vit_r": 1.0}, "illava_vit_r=1.0"),
        ({"illava_vit_r": 0.0}, "illava_vit_r=0.0"),
        ({"illava_llm_r": 1.5}, "illava_llm_r=1.5"),
        ({"illava_vit_r": -3}, "illava_vit_r=-3"),
        ({"illava_vit_r": "many"}, "illava_vit_r='many'"),
        ({"illava_vit_r": True}, "illava_vit_r=True"),
        ({"illava_vit_k": "5-x"}, "'x'"),
        ({"illava_vit_k": "5-5"}, "repeats"),
        ({"illava_vit_k": [-1]}, "-1"),
        ({"illava_vit_k": "-1"}, "illava_vit_k='-1': a leading"),  # not layer 1
        ({"illava_llm_k": "2--3"}, "illava_llm_k='2--3': a leading, trailing or doubled"),  # not 2-3
        ({"illava_vit_k": "5-6-"}, "illava_vit_k='5-6-'"),
        ({"illava_vit_k": "5,,6"}, "illava_vit_k='5,,6'"),
        ({"enable_illava_vit": "maybe"}, "enable_illava_vit='maybe'"),
        ({"enable_illava_llm": True, "illava_llm_k": "0-8"}, "layer 0"),
        ({"enable_illava_vit": True, "illava_vit_k": ""}, "illava_vit_k names no layer"),
    ],
)
def test_bad_values_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        IllavaConfig(**kwargs)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="illava_vit_rr"):
        IllavaConfig.from_dict({"illava_vit_rr": 3})
    with pytest.raises(ValueError, match="illava_vit_rr"):
        IllavaConfig.pop_from({"illava_vit_rr": 3, "pretrained": "x"})


def test_token_arithmetic_matches_the_seed_configurations():
    assert IllavaConfig(illava_vit_k="5-6-7-8", illava_vit_r=92).vit_token_counts(729)[-1] == 361
    assert IllavaConfig(illava_vit_k="2-3-4-5-6-7-8", illava_vit_r=80).vit_token_counts(729)[-1] == 169
    # a ratio removes floor(r * current) per layer
    assert IllavaConfig(illava_vit_k="1-2", illava_vit_r=0.5).vit_token_counts(9) == [9, 5, 3]
    # the LLM ratio is a keep ratio
    assert IllavaConfig(illava_llm_r=0.7).llm_tokens_removed(100) == 30
    assert IllavaConfig(illava_llm_r=0.01).llm_tokens_removed(10) == 9


def test_validation_against_a_model():
    config = IllavaConfig(enable_illava_vit=True, illava_vit_k="5-6-7-30", illava_vit_r=10)
    with pytest.raises(ValueError, match=r"\[30\].*26 layers"):
        config.validate_vit(num_layers=26, tokens_per_group=729)
    config = IllavaConfig(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=183)
    with pytest.raises(ValueError, match="illava_vit_r=183 on 4 layers leaves -3 of 729"):
        config.validate_vit(num_layers=26, tokens_per_group=729)
    config = IllavaConfig(enable_illava_vit=True, illava_vit_k="5-6-7-8", illava_vit_r=182)
    config.validate_vit(num_layers=26, tokens_per_group=729)  # exactly one token left is allowed
    with pytest.raises(ValueError, match=r"illava_llm_k=8: layer\(s\) \[8\].*8 layers"):
        IllavaConfig(enable_illava_llm=True, illava_llm_k=8).validate_llm(num_layers=8)
