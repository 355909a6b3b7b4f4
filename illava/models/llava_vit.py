"""LLaVA-ViT packing vision encoder (`LlavaViTPackingModel`), CPU-capable and weight-compatible.

A re-implementation of `model_factory/vit_preview_v0_packing_hf.py` from EvolvingLMMs-Lab/OneVision-Encoder: the
config fields, module attribute paths (hence state-dict keys) and numerics are the upstream ones, so checkpoints
converted for the upstream class load with `load_state_dict(strict=True)`. Unlike upstream, FlashAttention is
optional: `flash_attn_varlen_func` is used when it is importable and q/k/v are fp16/bf16 CUDA tensors, otherwise
`scaled_dot_product_attention` runs once per packed segment.

Input is Qwen2-VL style packing: `hidden_states [sum_i t_i*h_i*w_i, C*p*p]` (every patch flattened channel-first
as (C, p, p); frames in order, rows in raster order within a frame) and `grid_thw [n, 3]`. Each row of `grid_thw`
is one attention segment: a whole image, or a whole video (all its frames attend to each other).

Layout (state-dict keys in brackets)::

    patch_embed.proj            Conv2d(C, D, p, stride=p, bias=False)   [patch_embed.proj.weight]
    layernorm_pre               LayerNorm / RMSNorm                    [layernorm_pre.weight, .bias]
    encoder.layers[i]           LlavaViTEncoderLayer (nn.ModuleList)
        .layer_norm1, .layer_norm2
        .self_attn.qkv          Linear(D, 3D) fused q|k|v, with bias     [encoder.layers.0.self_attn.qkv.weight]
        .self_attn.proj         Linear(D, D)
        .mlp.fc1, .mlp.fc2      Linear(D, I), Linear(I, D), GELU between
    rotary_emb                  no parameters (non-persistent inv_freq_t / inv_freq_h / inv_freq_w buffers)
    layernorm_post, head        only when `config.use_head` (head: learned probe + nn.MultiheadAttention pooling)

Block call signature (what a token-merging wrapper around `encoder.layers[i]` receives)::

    layer(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=(cos, sin)) -> hidden_states

    hidden_states        [N, D]   packed tokens of all segments, in `dtype` of the model
    cu_seqlens           [n+1]    int32, cumulative segment lengths starting at 0 (cu_seqlens[-1] == N)
    position_embeddings  (cos, sin), each [N, head_dim] float32 (rows aligned with hidden_states)

`LlavaViTPackingModel.forward` computes `cu_seqlens` and `(cos, sin)` once and `LlavaViTEncoder.forward` hands the
same objects to every layer in turn, as keyword arguments. A layer that drops tokens must hand shortened
`cu_seqlens` / `position_embeddings` to the later layers itself (the encoder loop passes the originals). Inside a
layer, `self_attn(layer_norm1(x), cu_seqlens=..., position_embeddings=...)` is the attention residual branch and
`mlp(layer_norm2(x))` the MLP branch (pre-LN).

RoPE quirk kept on purpose: the frequency vector is `cat(freqs, freqs)` (rotate-half layout) but the rotation
pairs *adjacent* channels (2i, 2i+1), so channel 2i uses angle `emb[2i]` and 2i+1 uses `emb[2i+1]`; this is not
a true rotation, but the released weights were trained with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # optional: CPU and fp32 use the SDPA path
    flash_attn_varlen_func = None

__all__ = [
    "LLAVA_VIT_VARIANTS",
    "LlavaViTPackingConfig",
    "LlavaViTPackingModel",
    "LlavaViTPackingPreTrainedModel",
    "apply_rotary_pos_emb_vision",
    "check_grid_thw",
    "compute_patch_positions_from_grid_thw",
    "compute_patch_positions_with_interpolated_temporal",
    "interpolate_frame_indices",
    "llava_vit_packing_config",
]


class LlavaViTPackingConfig(PretrainedConfig):
    """Config of the LLaVA-ViT packing encoder; field names and defaults are upstream's.

    `temporal_patch_size` and `spatial_merge_size` are kept for config compatibility only (patches are 2-D and
    there is no merger in the encoder). `layer_norm_type` is "layer_norm" or "rms_norm" and applies to
    `layernorm_pre`, `layernorm_post` and the per-layer norms; the pooling head's norm is always RMSNorm.
    """

    model_type = "llava_vit_packing"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        image_size: int = 448,
        patch_size: int = 16,
        temporal_patch_size: int = 1,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        layer_norm_type: str = "layer_norm",
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        rope_theta: float = 10000.0,
        use_head: bool = True,
        spatial_merge_size: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.layer_norm_type = layer_norm_type
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.rope_theta = rope_theta
        self.use_head = use_head
        self.spatial_merge_size = spatial_merge_size


def _variant(patch_size: int, hidden_size: int, num_attention_heads: int, num_hidden_layers: int) -> dict[str, int]:
    return dict(
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=4 * hidden_size,
    )


# Upstream registers these as timm models `hf_llava_vit_packing_<name>_ln` (LayerNorm, GELU, MLP ratio 4, head on).
LLAVA_VIT_VARIANTS: dict[str, dict[str, int]] = {
    "small": _variant(16, 384, 6, 6),
    "base": _variant(16, 768, 12, 12),
    "large": _variant(14, 1024, 16, 24),
    "huge": _variant(14, 1280, 20, 32),
    "giant": _variant(14, 1536, 16, 40),  # head_dim 96, the others 64
}


def llava_vit_packing_config(variant: str, **overrides) -> LlavaViTPackingConfig:
    """Config of a named variant: "small" ... "giant", or the upstream timm name "hf_llava_vit_packing_small_ln".

    `overrides` replace any field (e.g. `num_hidden_layers=2` for a quick test).
    """
    name = variant.removeprefix("hf_llava_vit_packing_").removesuffix("_ln")
    if name not in LLAVA_VIT_VARIANTS:
        raise ValueError(f"unknown LLaVA-ViT variant {variant!r}; known: {sorted(LLAVA_VIT_VARIANTS)}")
    fields = dict(LLAVA_VIT_VARIANTS[name], hidden_act="gelu", layer_norm_type="layer_norm", use_head=True)
    fields.update(overrides)
    return LlavaViTPackingConfig(**fields)


# ---------------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------------


def check_grid_thw(grid_thw, num_patches: int, *, allow_empty_rows: bool) -> list[list[int]]:
    """The rows of `grid_thw` as Python ints, once it is known to be an integer tensor `[images, 3]` of (t, h, w)
    covering exactly `num_patches` packed patches; otherwise a TypeError / ValueError naming what was passed.

    Every value must be at least 1, or at least 0 with `allow_empty_rows` (a row holding no patch, which
    `LlavaViTPackingModel` accepts); a grid without any patch is refused either way. All packing encoders check
    their input with this before anything else reads the grid (one host sync).
    """
    expected = "an integer tensor [images, 3] of (t, h, w) in patches"
    if not isinstance(grid_thw, torch.Tensor):
        raise TypeError(f"grid_thw must be {expected}, got a {type(grid_thw).__name__}")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype.is_complex or grid_thw.dtype == torch.bool:
        raise TypeError(f"grid_thw must be {expected}, got dtype {grid_thw.dtype} (shape {tuple(grid_thw.shape)})")
    if grid_thw.dim() != 2 or grid_thw.shape[0] == 0 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be {expected} with at least one row, got shape {tuple(grid_thw.shape)}")
    rows = grid_thw.tolist()
    smallest = 0 if allow_empty_rows else 1
    for index, row in enumerate(rows):
        if min(row) < smallest:
            raise ValueError(f"grid_thw row {index} is {row}: t, h and w must be at least {smallest}")
    total = sum(t * h * w for t, h, w in rows)
    if total != num_patches:
        raise ValueError(f"grid_thw covers {total} patches but hidden_states has {num_patches} rows")
    if total == 0:
        raise ValueError(f"every row of grid_thw (shape {tuple(grid_thw.shape)}) is empty: no patch to encode")
    return rows


def compute_patch_positions_from_grid_thw(grid_thw: torch.Tensor) -> torch.Tensor:
    """`[N, 3]` long (t, h, w) position of every packed patch: frame index, row, column, per `grid_thw` row.

    Passing the result as `patch_positions` gives the same RoPE as passing `grid_thw` alone.
    """
    device = grid_thw.device
    per_segment = []
    for t, h, w in grid_thw.tolist():  # one host sync for the whole grid
        frame = torch.arange(t, device=device).repeat_interleave(h * w)
        row = torch.arange(h, device=device).repeat_interleave(w).repeat(t)
        col = torch.arange(w, device=device).repeat(t * h)
        per_segment.append(torch.stack((frame, row, col), dim=-1))
    return torch.cat(per_segment, dim=0)


def interpolate_frame_indices(
    frame_indices: torch.Tensor, total_frames: torch.Tensor, target_frames: int = 64
) -> torch.Tensor:
    """Map frame indices of `[B, L]` clips with `total_frames [B]` frames onto a `target_frames` timeline.

    `round(idx / max(total - 1, 1) * (target_frames - 1))`, clamped to `[0, target_frames - 1]`, as long; e.g. 8
    frames -> [0, 9, 18, 27, 36, 45, 54, 63]. The source (non-packing) model saw videos in a 64-frame context, so
    its temporal RoPE positions are these, not 0..L-1.
    """
    denominator = (total_frames.float().view(-1, 1) - 1).clamp(min=1.0)
    scaled = frame_indices.float() / denominator * (target_frames - 1)
    return scaled.round().long().clamp(0, target_frames - 1)


def compute_patch_positions_with_interpolated_temporal(
    interpolated_indices: torch.Tensor, h_patches: int, w_patches: int, device: torch.device | str
) -> torch.Tensor:
    """`[B*F*h*w, 3]` long (t, h, w) positions for `B` clips of `F` frames each, t taken from `interpolated_indices`.

    `interpolated_indices` is `[B, F]` (e.g. from `interpolate_frame_indices`); patches are ordered clip, frame,
    row, column, as in the packed input.
    """
    frames = interpolated_indices.reshape(-1).to(device=device, dtype=torch.long)
    patches_per_frame = h_patches * w_patches
    frame = frames.repeat_interleave(patches_per_frame)
    row = torch.arange(h_patches, device=device).repeat_interleave(w_patches).repeat(frames.numel())
    col = torch.arange(w_patches, device=device).repeat(frames.numel() * h_patches)
    return torch.stack((frame, row, col), dim=-1)


def _cu_seqlens_from_grid(grid_thw: torch.Tensor) -> torch.Tensor:
    lengths = grid_thw.prod(dim=-1).cumsum(dim=0)
    return F.pad(lengths, (1, 0), value=0).to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------


def _norm(config: LlavaViTPackingConfig) -> nn.Module:
    if config.layer_norm_type == "rms_norm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def _rotate_adjacent_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary_pos_emb_vision(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on `q`, `k` `[N, heads, head_dim]` with `cos`, `sin` `[N, head_dim]`, computed in fp32.

    Channels are rotated in adjacent pairs while `cos`/`sin` come in the `cat(freqs, freqs)` layout (see the module
    docstring); results are cast back to the input dtypes.
    """
    cos = cos.unsqueeze(-2).float()
    sin = sin.unsqueeze(-2).float()
    q32, k32 = q.float(), k.float()
    q_out = q32 * cos + _rotate_adjacent_pairs(q32) * sin
    k_out = k32 * cos + _rotate_adjacent_pairs(k32) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


class LlavaViTRotaryEmbedding(nn.Module):
    """3-D RoPE angles: half of head_dim split 4:6:6 over (t, h, w), each axis with its own theta^(-i/n) ladder."""

    def __init__(self, config: LlavaViTPackingConfig) -> None:
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        if head_dim % 32 != 0:
            raise ValueError(
                f"LLaVA-ViT RoPE needs head_dim divisible by 32 (4:6:6 split of head_dim/2), got {head_dim}"
            )
        unit = head_dim // 32
        self.theta = config.rope_theta
        self.axis_sizes = (4 * unit, 6 * unit, 6 * unit)
        # Non-persistent buffers like upstream, so `.to(dtype)` affects them the same way.
        for name, inv_freq in zip(("inv_freq_t", "inv_freq_h", "inv_freq_w"), self._inverse_frequencies()):
            self.register_buffer(name, inv_freq, persistent=False)

    def _inverse_frequencies(self) -> list[torch.Tensor]:
        return [1.0 / (self.theta ** (torch.arange(n, dtype=torch.float32) / n)) for n in self.axis_sizes]

    def reset_inverse_frequencies(self) -> None:
        """Recompute the buffers (transformers 5 `from_pretrained` leaves non-persistent buffers uninitialised)."""
        for buffer, value in zip((self.inv_freq_t, self.inv_freq_h, self.inv_freq_w), self._inverse_frequencies()):
            init.copy_(buffer, value)

    def forward(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """`[N, head_dim]` angles for the positions implied by `grid_thw`."""
        return self.forward_from_positions(compute_patch_positions_from_grid_thw(grid_thw))

    def forward_from_positions(self, patch_positions: torch.Tensor) -> torch.Tensor:
        """`[N, head_dim]` angles for explicit `[N, 3]` (t, h, w) positions, laid out `cat(freqs, freqs)`."""
        positions = patch_positions.float()
        freqs = torch.cat(
            [
                positions[:, axis, None] * inv_freq.to(positions.device)[None, :]
                for axis, inv_freq in enumerate((self.inv_freq_t, self.inv_freq_h, self.inv_freq_w))
            ],
            dim=-1,
        )
        return torch.cat((freqs, freqs), dim=-1)


class LlavaViTPatchEmbed(nn.Module):
    """Flattened (C, p, p) patches `[N, C*p*p]` -> `[N, D]`; a bias-free Conv2d so the weight is `[D, C, p, p]`."""

    def __init__(self, config: LlavaViTPackingConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.in_channels = config.num_channels
        self.embed_dim = config.hidden_size
        self.proj = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        patches = hidden_states.reshape(-1, self.in_channels, self.patch_size, self.patch_size)
        return self.proj(patches.to(self.proj.weight.dtype)).view(-1, self.embed_dim)


class LlavaViTAttention(nn.Module):
    """Fused-qkv self-attention with 3-D RoPE over packed segments (no attention across segments)."""

    def __init__(self, config: LlavaViTPackingConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"hidden_size {self.embed_dim} is not divisible by num_attention_heads {self.num_heads}")
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=True)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        query, key, value = self.qkv(hidden_states).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
        dropout = self.dropout if self.training else 0.0
        if _use_flash(query):
            seg_lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            max_len = int(seg_lengths.max())
            context = flash_attn_varlen_func(
                query, key, value,
                cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_len, max_seqlen_k=max_len,
                dropout_p=dropout, softmax_scale=self.scale, causal=False,
            )
        else:
            context = self._segment_sdpa(query, key, value, cu_seqlens, dropout)
        return self.proj(context.reshape(tokens, self.embed_dim))

    def _segment_sdpa(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, dropout: float
    ) -> torch.Tensor:
        """Attention within each `[start, end)` of `cu_seqlens`; `[N, heads, head_dim]` in and out."""
        bounds = cu_seqlens.tolist()
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))  # [heads, L, head_dim]
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
            outputs.append(out.transpose(0, 1))
        return torch.cat(outputs, dim=0)


def _use_flash(query: torch.Tensor) -> bool:
    return flash_attn_varlen_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


class LlavaViTMLP(nn.Module):
    """fc1 -> activation (exact GELU for "gelu") -> fc2."""

    def __init__(self, config: LlavaViTPackingConfig) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class LlavaViTEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x)). See the module docstring for the call signature."""

    def __init__(self, config: LlavaViTPackingConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.layer_norm1 = _norm(config)
        self.layer_norm2 = _norm(config)
        self.self_attn = LlavaViTAttention(config)
        self.mlp = LlavaViTMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        attention = self.self_attn(
            self.layer_norm1(hidden_states), cu_seqlens=cu_seqlens, position_embeddings=position_embeddings
        )
        hidden_states = hidden_states + attention
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class LlavaViTEncoder(nn.Module):
    """The `layers` ModuleList, run in order with the same `cu_seqlens` / `position_embeddings`."""

    def __init__(self, config: LlavaViTPackingConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(LlavaViTEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns the last hidden states and, if asked, the input of every layer plus the final output."""
        collected: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                collected.append(hidden_states)
            hidden_states = layer(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
        if output_hidden_states:
            collected.append(hidden_states)
        return hidden_states, tuple(collected) if output_hidden_states else None


class LlavaViTAttentionPoolingHead(nn.Module):
    """SigLIP2-style pooling of one segment `[1, L, D]` -> `[1, D]`: a learned probe attends over the tokens."""

    def __init__(self, config: LlavaViTPackingConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = LlavaViTMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(hidden_states.shape[0], -1, -1)
        pooled, _ = self.attention(probe, hidden_states, hidden_states)
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class LlavaViTPackingPreTrainedModel(PreTrainedModel):
    config_class = LlavaViTPackingConfig
    base_model_prefix = "llava_vit_packing"
    main_input_name = "hidden_states"
    _no_split_modules = ["LlavaViTEncoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
        elif isinstance(module, LlavaViTAttentionPoolingHead):
            init.normal_(module.probe)  # upstream: torch.randn at construction
        elif isinstance(module, LlavaViTRotaryEmbedding):
            module.reset_inverse_frequencies()


class LlavaViTPackingModel(LlavaViTPackingPreTrainedModel):
    """LLaVA-ViT over packed images/videos.

    Returns `BaseModelOutputWithPooling(last_hidden_state [N, D], pooler_output [n, D] or None, hidden_states)`,
    or the tuple `(last_hidden_state, pooler_output, hidden_states)` with `return_dict=False`.
    `pooler_output` has one row per `grid_thw` row (the head pools each segment separately).
    """

    def __init__(self, config: LlavaViTPackingConfig) -> None:
        super().__init__(config)
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = LlavaViTPatchEmbed(config)
        self.layernorm_pre = _norm(config)
        self.encoder = LlavaViTEncoder(config)
        self.rotary_emb = LlavaViTRotaryEmbedding(config)
        # Upstream ties the post-norm to the head: without the head, last_hidden_state is not post-normalised.
        self.layernorm_post = _norm(config) if config.use_head else None
        self.head = LlavaViTAttentionPoolingHead(config) if config.use_head else None
        self.post_init()

    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor,
        patch_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode packed patches.

        Args:
            hidden_states: `[N, C*p*p]` flattened (C, p, p) patches, N = sum of t*h*w over `grid_thw`.
            grid_thw: `[n, 3]` integer (t, h, w) in patches per image/video; each row is one attention segment.
                A row with a 0 holds no patch: no tokens, and its `pooler_output` row pools nothing.
            patch_positions: optional `[N, 3]` (t, h, w) RoPE positions replacing those implied by `grid_thw`
                (e.g. interpolated frame indices for videos, see `compute_patch_positions_with_interpolated_temporal`).
            output_hidden_states: also return every layer's input and the encoder output (before layernorm_post).
            return_dict: `BaseModelOutputWithPooling` (default from config) or a tuple.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        patch_dim = self.config.num_channels * self.config.patch_size**2
        if hidden_states.dim() != 2 or hidden_states.shape[1] != patch_dim:
            raise ValueError(
                f"hidden_states must be [seq_len, {patch_dim}] patches flattened (C, p, p), "
                f"got {tuple(hidden_states.shape)}"
            )
        check_grid_thw(grid_thw, hidden_states.shape[0], allow_empty_rows=True)
        # long: products of small integer dtypes overflow; the patches' device: the RoPE tables are built on it
        grid_thw = grid_thw.to(hidden_states.device, torch.long)

        cu_seqlens = _cu_seqlens_from_grid(grid_thw)
        if patch_positions is None:
            angles = self.rotary_emb(grid_thw)
        else:
            if patch_positions.shape != (hidden_states.shape[0], 3):
                raise ValueError(
                    f"patch_positions must be [seq_len={hidden_states.shape[0]}, 3], got {tuple(patch_positions.shape)}"
                )
            angles = self.rotary_emb.forward_from_positions(patch_positions.to(hidden_states.device))
        position_embeddings = (angles.cos(), angles.sin())

        hidden_states = self.layernorm_pre(self.patch_embed(hidden_states))
        hidden_states, all_hidden_states = self.encoder(
            hidden_states,
            cu_seqlens=cu_seqlens,
            position_embeddings=position_embeddings,
            output_hidden_states=output_hidden_states,
        )

        pooled = None
        if self.head is not None:
            hidden_states = self.layernorm_post(hidden_states)
            bounds = cu_seqlens.tolist()
            pooled = torch.cat(
                [self.head(hidden_states[start:end].unsqueeze(0)) for start, end in zip(bounds[:-1], bounds[1:])]
            )

        if not return_dict:
            return hidden_states, pooled, all_hidden_states
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states, pooler_output=pooled, hidden_states=all_hidden_states
        )
