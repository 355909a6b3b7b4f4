"""LLM-stage merging inside a decoder stack, shared by every family: any text model whose layers are called as
`layer(hidden_states, attention_mask=, position_ids=, <cache>=, position_embeddings=(cos, sin))` with
`self_attn.{q,k}_proj` (optionally followed by per-head `q_norm` / `k_norm`), rotate-half RoPE and a `scaling`
attribute: the Qwen2 decoder of LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL, the Qwen3 decoder of Qwen3-VL /
Qwen3-VL-MoE, and the hybrid decoder of Qwen3.5 / Qwen3.5-MoE, whose Gated-DeltaNet layers (`linear_attn`, no
`self_attn`) sit between gated full-attention layers (checked on every release of the tested window,
`illava.compat`, which also names the cache keyword).

Prefill, at each merge layer k: the visual tokens of every image/video span are scored by the attention the
last prompt token pays them in the nearest full-attention layer before k (k-1 in a decoder of full-attention
layers only; one query row from that layer's q and k, captured by hooks on the projections, or on the q/k norms
where the attention has them, so any attention backend works). A linear-attention layer has no attention weights
to read (a decayed recurrent state stands for the whole prefix), so a merge layer with no full-attention layer
before it is refused; a rotary embedding that covers only the first dimensions of a head (Qwen3.5's partial
rotary) is applied to those dimensions only, as the layer does. Several merge layers may share one scoring layer
(Qwen3.5's full attention comes every 4th layer): its scores are kept per original position, and a later merge
ranks the tokens that survived the earlier ones by them. Each span loses `illava_llm_r` tokens the way
`illava_llm_mode` says (the iLLaVA merge by default); the span's last visual token always survives.
Layers >= k run on the shortened sequence: their hidden states, rotary cos/sin, position ids and mask are
gathered at the kept positions (positions stay in the original index space). Samples of a batch that keep
different counts are left-padded with masked slots so the batch stays rectangular and the last token stays last.
Each kind of layer gets its own mask at the kept positions: full attention its causal mask, linear attention its
2-D padding mask (None without padding) with the padding slots zeroed as padding, so that, left of every real
token, they leave its recurrent and conv states at zero: a linear-attention layer after a merge runs its
recurrence over the kept tokens only.
The output is scattered back to the full length, so logits line up with the input for every caller (NaN at the
positions merged away: they have no output).

The KV cache of layers >= k holds only kept tokens; a plan attached to the cache tells later forwards (decode
steps, continued generation) which original positions those entries stand for, so their mask columns are
`kept + new positions`. A linear-attention layer's cache is a state, not a per-token list: decode steps continue
its recurrence as they are. The first layer and the first full-attention layer always run on the whole prompt
(no merge precedes them), so the cache length transformers reads from either stays the prompt's.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
from transformers import DynamicCache

from .. import compat, merge
from ..state import IllavaState
from ..trace import LanguageTrace

CACHE_PLAN_ATTRIBUTE = "_illava_plan"
SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


@dataclasses.dataclass
class Layout:
    """Which original positions the (shortened) sequence of a range of layers holds."""

    index: torch.Tensor  # [B, L'] original position per slot (0 in padding slots)
    valid: torch.Tensor  # [B, L'] False for padding slots inserted to keep the batch rectangular
    span: torch.Tensor  # [B, L'] image/video span id, -1 for text and padding

    def has_padding_slots(self) -> bool:
        return not bool(self.valid.all())


@dataclasses.dataclass
class CachePlan:
    """Attached to a KV cache after a merged prefill: the layout each layer's cache entries follow."""

    prefill_length: int
    layouts: list[tuple[int, Layout]]  # (first layer using it, layout), ascending

    def select_rows(self, rows: torch.Tensor) -> None:
        """Follow the cache when generate() reorders or selects its batch rows (beam search)."""
        self.layouts = [
            (first, Layout(layout.index[rows], layout.valid[rows], layout.span[rows])) for first, layout in self.layouts
        ]

    def layout_for(self, layer: int) -> Layout | None:
        chosen = None
        for first_layer, layout in self.layouts:
            if first_layer <= layer:
                chosen = layout
        return chosen


def _gather_positions(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the sequence dimension (last) of `[..., B or 1, L]` at `index [B, L']`."""
    batch = index.shape[0]
    expanded = tensor.expand(*tensor.shape[:-2], batch, tensor.shape[-1])
    return expanded.gather(-1, index.expand(*tensor.shape[:-2], *index.shape))


def _gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather dim 1 of `[B or 1, L, d]` at `index [B, L']`."""
    expanded = tensor.expand(index.shape[0], *tensor.shape[1:])
    return expanded.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))


def slice_padding_mask(mask, columns: torch.Tensor, column_valid: torch.Tensor):
    """A `[B, K]` padding mask (flash attention's, and the one linear-attention layers multiply their input by) at
    the original positions `columns [B, K]`, masked at the padding slots (`column_valid` False). A mask of None (no
    padding) stays None while no padding slot exists."""
    if mask is None:
        return None if bool(column_valid.all()) else column_valid.long()
    return mask.gather(1, columns).bool().logical_and(column_valid).to(mask.dtype)


def slice_mask(mask, rows, row_original, row_is_padding, columns, column_valid, implementation, dtype):
    """The attention mask of a shortened sequence, in the format the attention implementation expects.

    `rows [B, Q]`: the rows of the full mask the queries take (their original positions `row_original`);
    `columns [B, K]`: the original positions of the keys, `column_valid [B, K]` False at padding slots;
    `row_is_padding [B, Q]`: padding-slot queries, which attend only to their own slot so no row is fully masked.
    A mask of None (causal, no padding) stays None while no padding slot exists.
    """
    batch, num_rows = rows.shape
    needs_padding = not bool(column_valid.all())
    if "flash" in implementation:  # a [B, K] padding mask; causality is implicit
        return slice_padding_mask(mask, columns, column_valid)
    if mask is None:
        if not needs_padding:
            return None
        allowed = (columns[:, None, :] <= row_original[:, :, None])[:, None]
    else:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise NotImplementedError(f"illava: LLM merging cannot slice an attention mask of type {type(mask)}")
        full = mask.expand(batch, *mask.shape[1:])
        picked = full.gather(2, rows[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3]))
        picked = picked.gather(3, columns[:, None, None, :].expand(-1, full.shape[1], num_rows, -1))
        allowed = picked if picked.dtype == torch.bool else picked == 0
    allowed = allowed & column_valid[:, None, None, :]
    if bool(row_is_padding.any()):
        slots = torch.arange(columns.shape[1], device=columns.device)
        own_slot = slots[None, :] == torch.arange(num_rows, device=columns.device)[:, None]
        allowed = torch.where(row_is_padding[:, None, :, None], own_slot[None, None], allowed)
    if implementation == "eager" or (mask is not None and mask.dtype != torch.bool):
        float_dtype = mask.dtype if mask is not None else dtype
        return torch.zeros_like(allowed, dtype=float_dtype).masked_fill(~allowed, torch.finfo(float_dtype).min)
    return allowed


class _Prefill:
    """Per-forward state of a prefill that merges."""

    def __init__(self, span: torch.Tensor, key_mask: torch.Tensor | None, track_sources: bool,
                 prompt_end: int | torch.Tensor | None = None):
        batch, length = span.shape
        self.length = length
        # Tokens at or after `prompt_end[b]` follow the prompt (generate(use_cache=False) re-runs the prompt with
        # the tokens generated so far; a loglikelihood appends the continuation): scoring by the last *prompt*
        # token, and only the keys it sees, merges exactly as the prefill of the prompt alone does.
        self.prompt_end = None
        if prompt_end is not None:
            end = _checked_prompt_end(prompt_end, span)
            self.prompt_end = end if bool((end < length).any()) else None
        self.initial_span = span
        self.key_mask = key_mask  # [B, L] bool from the 2-D attention mask, or None
        self.layout: Layout | None = None
        self.layouts: list[tuple[int, Layout]] = []
        self.sliced: dict[bool, dict] = {}  # per layer kind (linear attention or not): its inputs at `layout`
        self.capture: dict[int, dict] = {}  # per scoring layer: its last query row, keys, rotary, while unscored
        self.scores: dict[int, torch.Tensor] = {}  # per scoring layer: [B, L] fp32 at the original positions
        self.sources = (
            torch.arange(length, device=span.device).repeat(batch, 1) if track_sources else None
        )

    def current(self) -> Layout:
        if self.layout is not None:
            return self.layout
        batch, length = self.initial_span.shape
        index = torch.arange(length, device=self.initial_span.device).repeat(batch, 1)
        return Layout(index=index, valid=torch.ones_like(index, dtype=torch.bool), span=self.initial_span)

    def attendable(self, layout: Layout) -> torch.Tensor:
        """Slots the scoring query may attend to (and the query is the last of them)."""
        attendable = layout.valid
        if self.key_mask is not None:
            attendable = attendable & self.key_mask.gather(1, layout.index)
        if self.prompt_end is not None:
            attendable = attendable & (layout.index < self.prompt_end[:, None])
        return attendable


class _Continuation:
    """Per-forward state of a forward on top of a merged cache (decode steps, continued prompts)."""

    def __init__(self, plan: CachePlan, past_length: int, new_tokens: int):
        self.plan = plan
        self.past_length = past_length
        self.new_tokens = new_tokens
        self.masks: dict[int, object] = {}


class LanguageModelMerger:
    """Installs the LLM stage on one decoder stack. The family patch feeds it the visual spans of each forward."""

    def __init__(self, state: IllavaState, language_model, model=None):
        """`model`: the whole model whose `generate` and `labels` the stage follows (see `follow_model`)."""
        self.state = state
        state.language_merger = self
        self.config = state.config
        self.language_model = language_model
        self.merge_layers = set(self.config.illava_llm_k)
        self.pending_spans: list[torch.Tensor] = []  # [B, L] span ids per modality, set before the forward
        self._per_thread = threading.local()  # `prompt_end`: set by generate() and `prompt_ends` for this thread
        self.labels: torch.Tensor | None = None  # of the model forward running now
        self.run: _Prefill | _Continuation | None = None
        layers = language_model.layers
        self.linear_attention_layers = {index for index, layer in enumerate(layers) if hasattr(layer, "linear_attn")}
        self.scoring_layer = self._scoring_layers(len(layers))  # merge layer -> the layer whose attention scores it
        implementation = language_model.config._attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"illava: LLM merging supports attention implementations {SUPPORTED_ATTENTION}, "
                f"the language model uses {implementation!r}"
            )
        state.before_forward(language_model, self._before_model, with_kwargs=True)
        state.after_forward(language_model, self._after_model, with_kwargs=True, always_call=True)
        for index in range(min(self.scoring_layer.values()), len(layers)):
            state.before_forward(layers[index], self._before_layer(index), with_kwargs=True)
        for index in set(self.scoring_layer.values()):
            attention = layers[index].self_attn
            # Qwen3 / Qwen3.5 normalise every head of q and k before RoPE: the scores need the normalised heads
            query_source = attention.q_norm if hasattr(attention, "q_norm") else attention.q_proj
            key_source = attention.k_norm if hasattr(attention, "k_norm") else attention.k_proj
            state.after_forward(query_source, self._capture(index, "query"))
            state.after_forward(key_source, self._capture(index, "key"))
        if model is not None and hasattr(model, "generate"):
            self.follow_model(model)

    def _scoring_layers(self, num_layers: int) -> dict[int, int]:
        """The nearest full-attention layer before each merge layer (see the module docstring)."""
        full_attention = [index for index in range(num_layers) if index not in self.linear_attention_layers]
        scoring, unscored = {}, []
        for layer in sorted(self.merge_layers):
            before = [index for index in full_attention if index < layer]
            if before:
                scoring[layer] = before[-1]
            else:
                unscored.append(layer)
        if unscored:
            advice = f"; merge at layers after {full_attention[0]}" if full_attention else ""
            raise ValueError(
                f"illava_llm_k={'-'.join(map(str, self.config.illava_llm_k))}: layer(s) {unscored} have no "
                f"full-attention layer before them to score the visual tokens (full-attention layers: "
                f"{full_attention}; linear-attention layers {sorted(self.linear_attention_layers)} have no attention "
                f"weights){advice}"
            )
        return scoring

    @property
    def prompt_end(self) -> int | torch.Tensor | list[int] | None:
        """See `_Prefill`: where this thread's prompt ends, while its generate() or `prompt_ends` block runs."""
        return getattr(self._per_thread, "prompt_end", None)

    @prompt_end.setter
    def prompt_end(self, value) -> None:
        self._per_thread.prompt_end = value

    def follow_model(self, model) -> None:
        """Watch the calls of the whole model: the prompt length while `generate` runs (see
        `_Prefill.prompt_end`), and the `labels` of a forward (checked against the merged-away positions)."""

        def remember_labels(module, args, kwargs):
            self.labels = kwargs.get("labels")

        self.state.before_forward(model, remember_labels, with_kwargs=True)

        def generate(module, original, *args, **kwargs):
            prompt = kwargs.get("input_ids", args[0] if args else None)
            if prompt is None:
                prompt = kwargs.get("inputs_embeds")
            outer, self.prompt_end = self.prompt_end, None if prompt is None else int(prompt.shape[1])
            try:
                return original(*args, **kwargs)
            finally:
                self.prompt_end = outer

        self.state.override_method(model, "generate", generate)

    def current_layout(self) -> Layout | None:
        """Which original positions the running prefill's sequence holds, once a layer has merged (else None)."""
        return self.run.layout if isinstance(self.run, _Prefill) else None

    # -- per forward ---------------------------------------------------------------------------------------

    def _before_model(self, module, args, kwargs):
        spans, self.pending_spans = self.pending_spans, []
        cache = compat.cache_argument(kwargs)
        plan = getattr(cache, CACHE_PLAN_ATTRIBUTE, None) if cache is not None else None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = kwargs.get("input_ids", args[0] if args else None)
        past_length = int(cache.get_seq_length()) if cache is not None else 0  # a tensor from a linear-attention layer
        span = self._combine(spans) if spans else None
        if span is not None and bool((span >= 0).any()):
            if cache is not None and not isinstance(cache, DynamicCache):
                raise ValueError(
                    f"illava: LLM merging keeps a shorter KV cache in merged layers and needs a DynamicCache, "
                    f"got {type(cache).__name__}"
                )
            if past_length > 0:
                raise ValueError(
                    "illava: LLM merging of a prompt with images/videos needs an empty KV cache "
                    f"(this one already holds {past_length} tokens); chunked prefill is not supported"
                )
            attention_mask = kwargs.get("attention_mask")
            key_mask = attention_mask.bool() if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
            self.run = _Prefill(span, key_mask, self.config.illava_track_llm_source, self.prompt_end)
            self.state.trace.language = []
        elif plan is not None:
            self.run = _Continuation(plan, past_length, embeds.shape[1])
        else:
            self.run = None

    @staticmethod
    def _combine(spans: list[torch.Tensor]) -> torch.Tensor:
        combined = spans[0].clone()
        for extra in spans[1:]:
            offset = int(combined.max()) + 1
            combined = torch.where(extra >= 0, extra + offset, combined)
        return combined

    def _after_model(self, module, args, kwargs, output):
        run, self.run = self.run, None
        if not isinstance(run, _Prefill) or run.layout is None or output is None:
            return output
        labels, self.labels = self.labels, None
        if labels is not None:
            _check_labels_are_kept(labels, run.layout)
        cache = compat.output_cache(output)
        if cache is None:
            cache = compat.cache_argument(kwargs)
        if cache is not None:
            _attach_plan(cache, CachePlan(prefill_length=run.length, layouts=run.layouts))
        output.last_hidden_state = self._scatter_back(output.last_hidden_state, run.layout, run.length)
        return output

    @staticmethod
    def _scatter_back(hidden: torch.Tensor, layout: Layout, length: int) -> torch.Tensor:
        """`[B, L', D]` -> `[B, L, D]` at the original positions. Merged-away positions have no output: they
        hold NaN, so that reading one is loud, never a plausible number."""
        full = hidden.new_full((hidden.shape[0], length, hidden.shape[-1]), float("nan"))
        batch_index, slot = layout.valid.nonzero(as_tuple=True)
        full[batch_index, layout.index[batch_index, slot]] = hidden[batch_index, slot]
        return full

    # -- per layer -----------------------------------------------------------------------------------------

    def _before_layer(self, layer_index: int):
        def hook(module, args, kwargs):
            run = self.run
            if isinstance(run, _Prefill):
                return self._prefill_layer(run, layer_index, args, kwargs)
            if isinstance(run, _Continuation):
                return self._continuation_layer(run, layer_index, args, kwargs)
            return None

        return hook

    def _prefill_layer(self, run: _Prefill, layer_index: int, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if layer_index in self.merge_layers:
            hidden = self._merge(run, layer_index, hidden)
        if run.layout is not None:
            linear = layer_index in self.linear_attention_layers
            if linear not in run.sliced:
                run.sliced[linear] = self._slice_prefill_inputs(run.layout, kwargs, linear)
            kwargs.update(run.sliced[linear])
        if layer_index in self.scoring_layer.values():
            layout = run.current()
            attendable = run.attendable(layout)
            last = (attendable.long() * torch.arange(1, attendable.shape[1] + 1, device=hidden.device)).argmax(1)
            run.capture[layer_index] = {"last": last, "attendable": attendable, "layout": layout,
                                        "rotary": kwargs["position_embeddings"]}
        return (hidden, *args[1:]), kwargs

    def _capture(self, layer_index: int, name: str):
        """A forward hook that keeps the scoring layer's keys, or its query row of the last prompt token."""

        def hook(module, inputs, output):
            run = self.run
            if not isinstance(run, _Prefill) or layer_index not in run.capture:
                return
            capture = run.capture[layer_index]
            if name == "query":
                output = output[torch.arange(output.shape[0], device=output.device), capture["last"]]
            capture[name] = output

        return hook

    def _scores(self, run: _Prefill, layer_index: int) -> torch.Tensor:
        """`[B, L']` at the slots of the current layout: the scoring layer's attention of the last prompt token."""
        layout = run.current()
        scoring = self.scoring_layer[layer_index]
        if scoring not in run.scores:
            run.scores[scoring] = self._last_token_attention(scoring, run.capture.pop(scoring), run.length)
        return run.scores[scoring].gather(1, layout.index).masked_fill(~layout.valid, 0)

    def _last_token_attention(self, layer_index: int, capture: dict, length: int) -> torch.Tensor:
        """`[B, length]`: the attention layer `layer_index`'s last prompt token pays each original position (0 where
        the layer held no token)."""
        attention = self.language_model.layers[layer_index].self_attn
        head_dim = attention.head_dim
        batch = capture["key"].shape[0]
        cos, sin = (part.float().expand(batch, *part.shape[1:]) for part in capture["rotary"])
        rows = torch.arange(batch, device=cos.device)
        last = capture["last"]
        query = capture["query"].float().view(batch, -1, head_dim)
        query = merge.apply_rotary(query, cos[rows, last][:, None], sin[rows, last][:, None])
        key = capture["key"].float().view(batch, capture["key"].shape[1], -1, head_dim).transpose(1, 2)
        key = merge.apply_rotary(key, cos[:, None], sin[:, None])
        scores = merge.last_query_attention(query, key, attention.scaling, capture["attendable"])
        layout = capture["layout"]
        by_position = scores.new_zeros(batch, length)
        batch_index, slot = layout.valid.nonzero(as_tuple=True)
        by_position[batch_index, layout.index[batch_index, slot]] = scores[batch_index, slot]
        return by_position

    def _merge(self, run: _Prefill, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        layout = run.current()
        scores = self._scores(run, layer_index)
        # The last visual token of a span predicts the text after it (a caller's loglikelihood reads that logit):
        # it always survives, as its own token or as the one its group merges into. "shift" ignores scores and
        # always merges the last token away, so there the last token stays out of the candidates instead.
        last = _last_of_each_span(layout.span)
        options = self.config.merge_options("llm")
        if options["mode"] == "shift":
            span = layout.span.masked_fill(last, -1)

            def removed(size):  # counted on the whole span; one candidate must remain to shift into
                return min(self.config.llm_tokens_removed(size + 1), max(size - 1, 0))

        else:
            span, removed = layout.span, self.config.llm_tokens_removed
            scores = scores.masked_fill(last, torch.finfo(scores.dtype).max)
        result = merge.merge_spans(hidden, scores, span, removed, **options)
        keep = result.keep & layout.valid
        if bool(keep[layout.valid].all()):
            self._record(run, layer_index, layout)
            return hidden
        if run.sources is not None:
            self._update_sources(run, layout, result.owner)
        new_layout, source_slot = _compact(layout, keep)
        run.layout, run.sliced = new_layout, {}
        run.layouts.append((layer_index, new_layout))
        self._record(run, layer_index, new_layout)
        gathered = result.hidden.gather(1, source_slot[..., None].expand(-1, -1, hidden.shape[-1]))
        return gathered.masked_fill(~new_layout.valid[..., None], 0)

    @staticmethod
    def _update_sources(run: _Prefill, layout: Layout, owner_slot: torch.Tensor) -> None:
        # slot -> original position of its owner (-1: dropped, none); then follow every original
        # position through it
        owner_position = torch.where(
            owner_slot >= 0, layout.index.gather(1, owner_slot.clamp(min=0)), -1
        )
        slot_of_position = torch.zeros_like(run.sources)
        batch_index, slot = layout.valid.nonzero(as_tuple=True)
        slot_of_position[batch_index, layout.index[batch_index, slot]] = slot
        current = run.sources
        followed = owner_position.gather(1, slot_of_position.gather(1, current.clamp(min=0)))
        run.sources = torch.where(current >= 0, followed, -1)

    def _record(self, run: _Prefill, layer_index: int, layout: Layout) -> None:
        spans = layout.span[layout.span >= 0]
        counts = torch.bincount(spans, minlength=int(run.initial_span.max()) + 1) if spans.numel() else spans
        self.state.trace.language.append(
            LanguageTrace(
                layer=layer_index,
                positions=layout.index.masked_fill(~layout.valid, -1),
                visual_tokens_per_span=counts.tolist(),
                sources=None if run.sources is None else run.sources.clone(),
            )
        )

    def _slice_prefill_inputs(self, layout: Layout, kwargs, linear_attention: bool) -> dict:
        cos, sin = kwargs["position_embeddings"]
        sliced = {"position_embeddings": (_gather_rows(cos, layout.index), _gather_rows(sin, layout.index))}
        if kwargs.get("position_ids") is not None:
            sliced["position_ids"] = _gather_positions(kwargs["position_ids"], layout.index)
        if linear_attention:
            sliced["attention_mask"] = slice_padding_mask(kwargs.get("attention_mask"), layout.index, layout.valid)
            return sliced
        sliced["attention_mask"] = slice_mask(
            kwargs.get("attention_mask"),
            rows=layout.index,
            row_original=layout.index,
            row_is_padding=~layout.valid,
            columns=layout.index,
            column_valid=layout.valid,
            implementation=self.language_model.config._attn_implementation,
            dtype=cos.dtype,
        )
        return sliced

    def _continuation_layer(self, run: _Continuation, layer_index: int, args, kwargs):
        layout = run.plan.layout_for(layer_index)
        if layout is None or layer_index in self.linear_attention_layers:
            # a linear-attention layer continues its recurrent state; its padding mask covers the new tokens only
            return None
        cache = compat.cache_argument(kwargs)
        decoded = run.past_length - run.plan.prefill_length
        expected = layout.index.shape[1] + decoded
        if cache is not None and cache.get_seq_length(layer_index) != expected:
            raise RuntimeError(
                f"illava: layer {layer_index}'s KV cache holds {cache.get_seq_length(layer_index)} entries, the merge "
                f"plan expects {expected}; the cache was edited (cropped, reordered) outside illava"
            )
        key = id(layout)
        if key not in run.masks:
            batch, device = layout.index.shape[0], layout.index.device
            new_positions = torch.arange(run.plan.prefill_length, run.past_length + run.new_tokens, device=device)
            columns = torch.cat((layout.index, new_positions.expand(batch, -1)), dim=1)
            column_valid = torch.cat((layout.valid, torch.ones(batch, new_positions.numel(), dtype=torch.bool, device=device)), dim=1)
            rows = torch.arange(run.new_tokens, device=device).expand(batch, -1)
            run.masks[key] = slice_mask(
                kwargs.get("attention_mask"),
                rows=rows,
                row_original=rows + run.past_length,
                row_is_padding=torch.zeros_like(rows, dtype=torch.bool),
                columns=columns,
                column_valid=column_valid,
                implementation=self.language_model.config._attn_implementation,
                dtype=kwargs["position_embeddings"][0].dtype,
            )
        kwargs["attention_mask"] = run.masks[key]
        return args, kwargs


def _checked_prompt_end(prompt_end: int | list[int] | torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """`[B]` prompt ends that fit this input: one per row, within it, and after the row's images and videos (the
    scoring query is the prompt's last token; before the visual tokens it would score nothing meaningful)."""
    batch, length = span.shape
    end = torch.as_tensor(prompt_end, device=span.device)
    if end.dim() > 1 or (end.dim() == 1 and end.numel() != batch):
        raise ValueError(f"illava.prompt_ends: {end.numel()} prompt lengths for a batch of {batch} rows")
    end = end.expand(batch)
    positions = torch.arange(length, device=span.device)
    last_visual = torch.where(span >= 0, positions, -1).amax(dim=1)
    for row, (row_end, row_last) in enumerate(zip(end.tolist(), last_visual.tolist())):
        if not row_last < row_end <= length:
            raise ValueError(
                f"illava.prompt_ends: a prompt of {row_end} tokens in row {row} does not fit the input: it must end "
                f"after the row's last image/video token (position {row_last}) and within its {length} tokens"
            )
    return end


def _last_of_each_span(span: torch.Tensor) -> torch.Tensor:
    """`[B, L]` True at the last slot of every span (text may interrupt a span: Qwen3-VL's frame timestamps)."""
    batch, length = span.shape
    slots = torch.arange(length, device=span.device).expand(batch, -1)
    ids = span.clamp(min=0)
    last = torch.full((batch, max(int(span.max()), 0) + 1), -1, dtype=torch.long, device=span.device)
    last.scatter_reduce_(1, ids, torch.where(span >= 0, slots, -1), reduce="amax")
    return (span >= 0) & (slots == last.gather(1, ids))


def _check_labels_are_kept(labels: torch.Tensor, layout: Layout) -> None:
    """A loss reads the logits at position i for the label at i+1: those positions must have survived."""
    batch, length = labels.shape
    kept = torch.zeros(batch, length, dtype=torch.bool, device=layout.index.device)
    rows, slots = layout.valid.nonzero(as_tuple=True)
    kept[rows, layout.index[rows, slots]] = True
    read = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False).to(kept.device)
    missing = (read & ~kept).nonzero()
    if missing.numel():
        row, position = (int(value) for value in missing[0])
        raise ValueError(
            f"illava: the labels need the logits at {missing.shape[0]} position(s) that LLM-stage merging merged away "
            f"(first: row {row}, position {position}, a visual token); set the labels of image/video placeholder "
            "tokens to -100 (only the text after each image/video can be scored), or turn the LLM stage off"
        )


def _compact(layout: Layout, keep: torch.Tensor) -> tuple[Layout, torch.Tensor]:
    """Drop the slots `keep` rejects; left-pad samples that keep fewer so the batch stays rectangular.

    Returns the new layout and, per new slot, the slot of the old layout it comes from.
    """
    counts = keep.sum(dim=1)
    length = int(counts.max())
    batch_index, old_slot = keep.nonzero(as_tuple=True)
    new_slot = (keep.long().cumsum(dim=1) - 1 + (length - counts)[:, None])[batch_index, old_slot]
    source_slot = torch.zeros(keep.shape[0], length, dtype=torch.long, device=keep.device)
    source_slot[batch_index, new_slot] = old_slot
    valid = torch.zeros(keep.shape[0], length, dtype=torch.bool, device=keep.device)
    valid[batch_index, new_slot] = True
    index = layout.index.gather(1, source_slot).masked_fill(~valid, 0)
    span = layout.span.gather(1, source_slot).masked_fill(~valid, -1)
    return Layout(index=index, valid=valid, span=span), source_slot


def _attach_plan(cache, plan: CachePlan) -> None:
    """Store the plan on the cache; batch-row edits of the cache (beam search) are applied to the plan too."""
    if getattr(cache, CACHE_PLAN_ATTRIBUTE, None) is None:
        for name, rows_of in (
            ("reorder_cache", lambda argument, batch: argument),
            ("batch_select_indices", lambda argument, batch: argument),
            ("batch_repeat_interleave", lambda argument, batch: torch.arange(batch).repeat_interleave(argument)),
        ):
            original = getattr(cache, name)

            def edit_rows(argument, original=original, rows_of=rows_of):
                original(argument)
                current = getattr(cache, CACHE_PLAN_ATTRIBUTE)
                batch = current.layouts[0][1].index.shape[0]
                current.select_rows(torch.as_tensor(rows_of(argument, batch)).to(current.layouts[0][1].index.device))

            setattr(cache, name, edit_rows)
    setattr(cache, CACHE_PLAN_ATTRIBUTE, plan)
