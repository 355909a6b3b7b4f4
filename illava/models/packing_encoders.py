"""The packing vision encoders of the reference implementation (hulianyuyy/iLLaVA): AIMv2, DINOv3 and SigLIP2
NaFlex over packed, unpadded patches.

Each class wraps an instance of the transformers model (`Aimv2VisionModel`, `DINOv3ViTModel`, `Siglip2VisionModel`)
and adopts its submodules under their own names, so the state-dict keys are the transformers ones: `from_pretrained`
loads any checkpoint of that model, `load_state_dict` takes its state dicts, and the wrapped instance keeps working
on the same parameters. Checked on the tested window (`illava.compat`).

Input: `hidden_states [N, p*p*C]`, the patches of all images concatenated (no padding), each flattened channels-last
as (p, p, C) (`convert_to_packing_format`; LLaVA-ViT's own model uses (C, p, p)), and `grid_thw [n, 3]`, an integer
tensor of (t, h, w) in patches, each at least 1 (`check_grid_thw`). These are image encoders: a row with t > 1 is t
frames of one size, each encoded as an image of its own.

Output: `BaseModelOutputWithPooling` with
- `last_hidden_state [N, D]`: every patch token in input order. Per image it equals the transformers model's
  `last_hidden_state` (which is taken after the final norm: AIMv2 `rms_norm`, DINOv3 `norm`, SigLIP2
  `post_layernorm`), without DINOv3's CLS and register tokens;
- `pooler_output [frames, D]`: the model's own pooling per frame: AIMv2's and SigLIP2's attention-pooling `head`
  when the config has one (else None), DINOv3's normed CLS token.

How each matches its transformers model: AIMv2 and DINOv3 embed with a Conv2d, so every image is rebuilt from its
patches and goes through the model's own `embeddings` (AIMv2: RMSNorm and sincos or learned position embeddings;
DINOv3: CLS + registers prepended) and, for DINOv3, `rope_embeddings` (RoPE tables for that image's size, applied to
patches only). SigLIP2's Linear embedding takes the patches as they are; its position grid is resized per image
with the model's own `resize_positional_embeddings`. The layers then run on the packed sequence with the same
operations as the transformers layers; attention stays inside each frame: `scaled_dot_product_attention` per
segment, or `flash_attn_varlen_func` over all of them when flash-attn is installed and q/k/v are fp16/bf16 on CUDA.

Layer protocol (what the merging patch, `illava.patches.packing_encoders`, builds on)::

    hidden, segments = encoder.embed(hidden_states, grid_thw)   # [M, D], M = N + prefix tokens; PackedSegments
    for index in range(len(encoder.layers)):
        hidden = encoder.encoder_layer(index, hidden, segments)
    output = encoder.finish(hidden, segments)

`encoder_layer(index, ...)` is `mlp_residual(layer, attention_residual(layer, hidden, segments)[0])`;
`attention_residual` also returns the layer's query and key `[M, heads, head_dim]` (DINOv3's RoPE applied). The
same `segments` object reaches every layer and `finish`: a layer that removes tokens replaces its `cu_seqlens` and
`rotary` for everything after it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Aimv2VisionModel, DINOv3ViTModel, Siglip2VisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .llava_vit import check_grid_thw

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # optional: CPU and fp32 use the SDPA path
    flash_attn_varlen_func = None

__all__ = [
    "AIMv2Packing",
    "DINOv3ViTPacking",
    "PackedSegments",
    "PackingEncoder",
    "Siglip2NaflexPacking",
    "convert_to_packing_format",
    "packed_attention",
]


def convert_to_packing_format(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`images [B, C, H, W]` -> (`[B*h*w, p*p*C]` patches flattened (p, p, C) in raster order, `grid_thw [B, 3]`)."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"images of {height}x{width} pixels do not split into {patch_size}x{patch_size} patches")
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size).permute(0, 2, 4, 3, 5, 1)
    grid_thw = torch.tensor([[1, rows, cols]] * batch, device=images.device)
    return patches.reshape(batch * rows * cols, patch_size * patch_size * channels), grid_thw


def _images_from_patches(patches: torch.Tensor, frames: int, rows: int, cols: int, patch_size: int) -> torch.Tensor:
    """The inverse of `convert_to_packing_format` for one grid row: `[t*h*w, p*p*C]` -> `[t, C, h*p, w*p]`."""
    grid = patches.reshape(frames, rows, cols, patch_size, patch_size, -1)
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(frames, -1, rows * patch_size, cols * patch_size)


@dataclasses.dataclass
class PackedSegments:
    """What every layer of one packed call needs besides the hidden states."""

    grid_thw: torch.Tensor  # [n, 3] as given
    cu_seqlens: torch.Tensor  # [S+1] int32: one attention segment per frame, its prefix tokens first
    num_prefix: int  # tokens before the patches in every segment (DINOv3: CLS + registers; otherwise 0)
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # per-token (cos, sin) [M, head_dim]; identity on prefix

    def token_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`[M]` segment of every token and `[M]` its offset inside the segment (< num_prefix: a prefix token)."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        offset = torch.arange(segment.numel(), device=lengths.device) - self.cu_seqlens[:-1].long()[segment]
        return segment, offset


def packed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention within each `[start, end)` segment of `cu_seqlens`; q/k/v and the result are `[M, heads, head_dim]`."""
    if flash_attn_varlen_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return flash_attn_varlen_func(
            query, key, value, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=longest,
            max_seqlen_k=longest, dropout_p=dropout, softmax_scale=scale, causal=False,
        )
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [1, heads, L, head_dim], the layout the transformers SDPA path hands to the kernel
        q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
        outputs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _self_attention(
    attention: nn.Module, normed: torch.Tensor, segments: PackedSegments, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v projections of a transformers attention module, RoPE when `segments` has tables, packed attention.

    Returns the context `[M, D]` (before the output projection) and the query and key `[M, heads, head_dim]`.
    """
    shape = (normed.shape[0], attention.num_heads, attention.head_dim)
    query, key, value = (projection(normed).view(shape) for projection in
                         (attention.q_proj, attention.k_proj, attention.v_proj))
    if segments.rotary is not None:
        cos, sin = (table[:, None, :] for table in segments.rotary)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
    dropout = attention.dropout if attention.training else 0.0
    context = packed_attention(query, key, value, segments.cu_seqlens, scale, dropout)
    return context.reshape(normed.shape[0], -1), query, key


def _side(size) -> int:
    """A square patch size from a config (an int, or a pair of equal ints)."""
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ValueError(f"packed patches must be square, the config's patch_size is {tuple(size)}")
    return int(height)


class PackingEncoder(nn.Module):
    """Common part of the packing encoders: wrapping, input checks, the layer loop (see the module docstring)."""

    standard_class: type  # the transformers model a subclass wraps
    num_prefix_tokens = 0

    def __init__(self, vision_model: nn.Module):
        if not isinstance(vision_model, self.standard_class):
            raise TypeError(f"{type(self).__name__} wraps a {self.standard_class.__name__}, "
                            f"not a {type(vision_model).__name__}")
        super().__init__()
        self.config = vision_model.config
        for name, module in vision_model.named_children():  # same names: same state-dict keys
            self.add_module(name, module)
        self.train(vision_model.training)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> PackingEncoder:
        """`standard_class.from_pretrained(path, **kwargs)`, wrapped."""
        return cls(cls.standard_class.from_pretrained(path, **kwargs))

    @classmethod
    def from_config(cls, config) -> PackingEncoder:
        """A randomly initialised `standard_class(config)`, wrapped."""
        return cls(cls.standard_class(config))

    @property
    def patch_size(self) -> int:
        return _side(self.config.patch_size)

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> BaseModelOutputWithPooling:
        """Encode packed patches `[N, p*p*C]` ((p, p, C) flattened) of the frames in `grid_thw [n, 3]`."""
        hidden, segments = self.embed(hidden_states, grid_thw)
        for index in range(len(self.layers)):
            hidden = self.encoder_layer(index, hidden, segments)
        return self.finish(hidden, segments)

    def embed(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, PackedSegments]:
        """Token embeddings `[M, D]` of every frame (prefix tokens first) and the segments of the packed call."""
        patch_dim = self.patch_size**2 * self.config.num_channels
        if hidden_states.dim() != 2 or hidden_states.shape[1] != patch_dim:
            raise ValueError(f"hidden_states must be [total_patches, {patch_dim}] patches flattened (p, p, C), "
                             f"got {tuple(hidden_states.shape)}")
        grid = check_grid_thw(grid_thw, hidden_states.shape[0], allow_empty_rows=False)
        tokens, cos, sin = [], [], []
        start = 0
        for t, h, w in grid:
            frames, rotary = self.embed_frames(hidden_states[start : start + t * h * w], t, h, w)
            start += t * h * w
            tokens.append(frames.flatten(0, 1))
            if rotary is not None:
                cos.append(rotary[0].repeat(t, 1))
                sin.append(rotary[1].repeat(t, 1))
        hidden = torch.cat(tokens, dim=0)
        lengths = [self.num_prefix_tokens + h * w for t, h, w in grid for _ in range(t)]
        cu_seqlens = F.pad(torch.tensor(lengths, device=hidden.device).cumsum(0), (1, 0)).to(torch.int32)
        rotary = (torch.cat(cos), torch.cat(sin)) if cos else None
        return hidden, PackedSegments(grid_thw, cu_seqlens, self.num_prefix_tokens, rotary)

    def embed_frames(self, patches: torch.Tensor, frames: int, rows: int, cols: int):
        """One grid row `[t*h*w, p*p*C]` -> (`[t, prefix + h*w, D]`, per-token (cos, sin) of one frame or None)."""
        raise NotImplementedError

    def encoder_layer(self, index: int, hidden: torch.Tensor, segments: PackedSegments) -> torch.Tensor:
        layer = self.layers[index]
        hidden, _, _ = self.attention_residual(layer, hidden, segments)
        return self.mlp_residual(layer, hidden)

    def attention_residual(self, layer, hidden, segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def mlp_residual(self, layer, hidden) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, hidden: torch.Tensor, segments: PackedSegments) -> BaseModelOutputWithPooling:
        raise NotImplementedError

    def _pool_segments(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor | None:
        """The attention-pooling head run on each segment alone, `[S, D]`; None without a head."""
        head = getattr(self, "head", None)
        if head is None:
            return None
        bounds = cu_seqlens.tolist()
        return torch.cat([head(hidden[start:end][None]) for start, end in zip(bounds[:-1], bounds[1:])])


class AIMv2Packing(PackingEncoder):
    """`Aimv2VisionModel` over packed patches (e.g. apple/aimv2-large-patch14-native).

    `is_native` checkpoints (sincos position embeddings) take any size; the others have learned position
    embeddings for one `image_size` grid, and every image must have that size.
    """

    standard_class = Aimv2VisionModel

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def embed_frames(self, patches, frames, rows, cols):
        if not self.config.is_native:
            side = _side(self.config.image_size) // self.patch_size
            if (rows, cols) != (side, side):
                raise ValueError(
                    f"this AIMv2 checkpoint has learned position embeddings for {side}x{side} patches; got an image "
                    f"of {rows}x{cols} (use a native checkpoint, is_native=True, for other sizes)"
                )
        patches = patches.to(self.embeddings.patch_embed.weight.dtype)
        return self.embeddings(_images_from_patches(patches, frames, rows, cols, self.patch_size)), None

    def attention_residual(self, layer, hidden, segments):
        attention = layer.attention
        context, query, key = _self_attention(attention, layer.rms_norm1(hidden), segments, attention.scale)
        return hidden + attention.out_proj(context), query, key

    def mlp_residual(self, layer, hidden):
        return hidden + layer.ffn(layer.rms_norm2(hidden))

    def finish(self, hidden, segments):
        hidden = self.rms_norm(hidden)
        return BaseModelOutputWithPooling(last_hidden_state=hidden,
                                          pooler_output=self._pool_segments(hidden, segments.cu_seqlens))


class DINOv3ViTPacking(PackingEncoder):
    """`DINOv3ViTModel` over packed patches; every frame gets its CLS and register tokens inside the encoder, RoPE
    for its own size on its patches, and the output leaves the prefix tokens out (`pooler_output` is the CLS)."""

    standard_class = DINOv3ViTModel

    def __init__(self, vision_model: DINOv3ViTModel):
        super().__init__(vision_model)
        self.num_prefix_tokens = 1 + self.config.num_register_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layer

    def embed_frames(self, patches, frames, rows, cols):
        images = _images_from_patches(patches.to(self.embeddings.patch_embeddings.weight.dtype), frames, rows, cols,
                                      self.patch_size)
        tokens = self.embeddings(images)
        cos, sin = self.rope_embeddings(images)  # [h*w, head_dim], depends on the image size only
        prefix = self.num_prefix_tokens
        cos = torch.cat((cos.new_ones(prefix, cos.shape[-1]), cos))  # cos 1, sin 0: prefix tokens are not rotated
        sin = torch.cat((sin.new_zeros(prefix, sin.shape[-1]), sin))
        return tokens, (cos, sin)

    def attention_residual(self, layer, hidden, segments):
        attention = layer.attention
        context, query, key = _self_attention(attention, layer.norm1(hidden), segments, attention.scaling)
        return layer.drop_path(layer.layer_scale1(attention.o_proj(context))) + hidden, query, key

    def mlp_residual(self, layer, hidden):
        return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(hidden)))) + hidden

    def finish(self, hidden, segments):
        hidden = self.norm(hidden)
        _, offset = segments.token_layout()
        return BaseModelOutputWithPooling(last_hidden_state=hidden[offset >= segments.num_prefix],
                                          pooler_output=hidden[segments.cu_seqlens[:-1].long()])


class Siglip2NaflexPacking(PackingEncoder):
    """`Siglip2VisionModel` (NaFlex, e.g. google/siglip2-so400m-patch16-naflex) over packed patches: no padded batch,
    no `pixel_attention_mask`; each image's position grid is resized to its own (h, w)."""

    standard_class = Siglip2VisionModel

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def embed_frames(self, patches, frames, rows, cols):
        embeddings = self.embeddings
        tokens = embeddings.patch_embedding(patches.to(embeddings.patch_embedding.weight.dtype))
        side = embeddings.position_embedding_size
        grid = embeddings.position_embedding.weight.reshape(side, side, -1)
        shape = torch.tensor([[rows, cols]], device=grid.device)
        positions = embeddings.resize_positional_embeddings(grid, shape, max_length=rows * cols)
        return tokens.view(frames, rows * cols, -1) + positions, None

    def attention_residual(self, layer, hidden, segments):
        attention = layer.self_attn
        context, query, key = _self_attention(attention, layer.layer_norm1(hidden), segments, attention.scale)
        return hidden + attention.out_proj(context), query, key

    def mlp_residual(self, layer, hidden):
        return hidden + layer.mlp(layer.layer_norm2(hidden))

    def finish(self, hidden, segments):
        hidden = self.post_layernorm(hidden)
        return BaseModelOutputWithPooling(last_hidden_state=hidden,
                                          pooler_output=self._pool_segments(hidden, segments.cu_seqlens))
