"""Small random-weight models built from transformers configs, for tests, demos and CPU benchmarks.

Nothing here touches the network: the tokenizer is a byte-level vocabulary built in code and the weights are
random (seeded).
"""

from __future__ import annotations

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'video' %}<video>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer():
    """A Qwen2 tokenizer whose vocabulary is the 256 byte symbols plus the chat and media special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llava_onevision(
    image_size: int = 56,
    patch_size: int = 14,
    vision_layers: int = 6,
    text_layers: int = 4,
    grid_multiples: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 1), (2, 2)),
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """A random-weight LLaVA-OneVision (SigLIP + Qwen2) and its processor.

    `image_size=384, patch_size=14` gives the real SigLIP 27x27 token grid with a narrow width, so that the token
    counts of the paper setting (the README's family table) can be checked on CPU. `grid_multiples` are the anyres
    pinpoints in units of `image_size`.
    """
    model, processor = build_llava_onevision(
        byte_level_tokenizer(), image_size, patch_size,
        pinpoints=[[rows * image_size, cols * image_size] for rows, cols in grid_multiples],
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=False),
        seed=seed, attn_implementation=attn_implementation,
    )
    return model.eval(), processor


def build_llava_onevision(tokenizer, image_size: int, patch_size: int, pinpoints: list[list[int]], vision: dict,
                          text: dict, seed: int = 0, attn_implementation: str = "sdpa"):
    """A freshly initialised LLaVA-OneVision whose SigLIP tower and Qwen2 decoder take the config fields `vision` and
    `text`, for `tokenizer` (with `<image>` and `<video>`), and its processor (anyres over `pinpoints`); the builder
    of the tests, the benchmarks and the bundled model's training."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=image_size, patch_size=patch_size,
                           vision_use_head=False, **vision),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), **text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen2_vl(
    vision_depth: int = 6,
    text_layers: int = 6,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 64,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    model_class: str = "Qwen2VLForConditionalGeneration",
    text_width: int = 64,
):
    """A random-weight Qwen2-VL (or Qwen2.5-VL with `model_class="Qwen2_5_VLForConditionalGeneration"`) and its
    processor: patch 14, 2x2 spatial merge, temporal patch 2; images of up to `max_pixels` pixels. The language
    model has 4 heads of `text_width / 4` (vLLM's CPU attention takes heads of 32 and more: `text_width=128`)."""
    import transformers

    tokenizer = byte_level_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    qwen25 = model_class.startswith("Qwen2_5")
    vision = dict(depth=vision_depth, hidden_size=text_width, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if qwen25:
        vision.update(intermediate_size=64, out_hidden_size=text_width, window_size=56, fullatt_block_indexes=[2, 5])
        vision["hidden_size"] = 32
    else:
        vision.update(embed_dim=32, mlp_ratio=2)
    config_class = getattr(transformers, "Qwen2_5_VLConfig" if qwen25 else "Qwen2VLConfig")
    config = config_class(
        vision_config=vision,
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
            num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2 * text_width // 64, 3 * text_width // 64, 3 * text_width // 64]},
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor = transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(size=size),
        video_processor=transformers.Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_qwen3_vl(
    vision_depth: int = 6,
    text_layers: int = 6,
    deepstack_layers: tuple[int, ...] = (1, 3, 4),
    min_pixels: int = 64 * 64,
    max_pixels: int = 32 * 32 * 64,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    moe: bool = False,
    qwen3_5: bool = False,
    text_width: int = 64,
    rotary_fraction: float = 1.0,
):
    """A random-weight Qwen3-VL (or Qwen3-VL-MoE with `moe=True`) and its processor: patch 16, 2x2 spatial merge,
    temporal patch 2, learned position embeddings on an 8x8 grid, DeepStack features from `deepstack_layers`
    added after the first `len(deepstack_layers)` decoder layers. The video processor takes frames as given
    (pass `video_metadata` for the timestamps).

    `qwen3_5=True`: Qwen3.5 (or Qwen3.5-MoE): the same vision tower without DeepStack, and a language model of
    three Gated-DeltaNet (linear attention) layers per full-attention layer. The language model has 4 heads of
    `text_width / 4` (vLLM's CPU attention takes heads of 32 and more: `text_width=128`); `rotary_fraction`: the
    fraction of each head's dimensions that M-RoPE rotates (1 or 0.5; Qwen3.5 checkpoints rotate a quarter)."""
    import transformers

    tokenizer = byte_level_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=text_width,
                  num_position_embeddings=64, deepstack_visual_indexes=list(deepstack_layers))
    scale = text_width // 64
    text = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=text_width // 4,
                max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [4 * scale, 2 * scale, 2 * scale], "mrope_interleaved": True},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    if qwen3_5:
        del vision["deepstack_visual_indexes"]
        text.update(layer_types=[("full_attention" if index % 4 == 3 else "linear_attention")
                                 for index in range(text_layers)],
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                    linear_conv_kernel_dim=4)
        sections = [round(section * rotary_fraction) for section in text["rope_parameters"]["mrope_section"]]
        text["rope_parameters"] = dict(text["rope_parameters"], partial_rotary_factor=rotary_fraction,
                                       mrope_section=sections)
    prefix = ("Qwen3_5" if qwen3_5 else "Qwen3VL") + ("Moe" if moe else "")
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    pixels = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = transformers.Qwen3VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **pixels),
        video_processor=transformers.Qwen3VLVideoProcessor(
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 4}, do_sample_frames=False,
            cap_pixels_per_frame=False, **pixels),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    return model, processor
