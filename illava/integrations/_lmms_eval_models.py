"""lmms-eval model classes with iLLaVA merging; import through `illava.integrations.lmms_eval`.

lmms-eval's transformers-based models (`llava_hf`, `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`) load the checkpoint, the
processor and the accelerator setup; `illava.apply` then patches that model and processor instance. All models take
`dtype` as `llava_hf` does ("auto", the checkpoint's own, by default; "float32", "bfloat16", ...), where the Qwen
parents hard-code theirs (bfloat16 makes batched answers depend on the batch size). The request
loops are ours, shared by all classes, because the parents' do not fit merging: `llava_hf` generates one request at
a time and scores a loglikelihood against a context length counted without the image placeholders, the Qwen models
have no loglikelihood (`qwen3_vl` no multi-round generation either), and none hands per-sample data back. Here
requests are batched (left padding), the continuation is counted on the text, and every result carries a merge
report (`illava.report`) that lmms-eval logs with `--log_samples` under each sample's `token_counts`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any

import decord
import torch
from accelerate import PartialState
from loguru import logger as eval_logger
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.imports import require_package
from lmms_eval.models.model_utils.load_video import read_video
from lmms_eval.models.simple import qwen2_5_vl as lmms_qwen2_5_vl
from lmms_eval.models.simple import qwen2_vl as lmms_qwen2_vl
from lmms_eval.models.simple import qwen3_5 as lmms_qwen3_5
from lmms_eval.models.simple import qwen3_vl as lmms_qwen3_vl
from lmms_eval.models.simple.llava_hf import LlavaHf
from tqdm import tqdm
from transformers import PretrainedConfig

import illava

from ..config import IllavaConfig
from .checkpoints import check_checkpoint
from ..report import merge_reports

_IMAGE_MARKER = re.compile(r"<image(?: (\d+))?>")

CONVERT_HINT = (
    "{path} is a checkpoint in the original LLaVA-NeXT format (its config.json has `mm_vision_tower`); iLLaVA's "
    "lmms-eval models load the transformers format. Use the converted checkpoint (e.g. "
    "lmms-lab/llava-onevision-qwen2-7b-ov -> llava-hf/llava-onevision-qwen2-7b-ov-hf), or convert it with "
    "transformers' src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py "
    "--model_id <lmms-lab id> --pytorch_dump_folder_path <dir> (from a transformers source checkout)."
)


@dataclasses.dataclass
class MergeReport(TokenCounts):
    """Token counts whose logged form (each logged sample's `token_counts`) carries the iLLaVA merge report:
    lmms-eval 0.7 logs `TokenCounts.to_dict()` per request and offers no other per-sample hook to models."""

    illava: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "illava": self.illava}


def _checkpoint_type(pretrained: str) -> str:
    """`model_type` from the checkpoint's config.json, refusing the original LLaVA-NeXT format by name."""
    check_checkpoint(pretrained, "pretrained")
    try:
        config, _ = PretrainedConfig.get_config_dict(pretrained)
    except OSError as error:
        raise ValueError(
            f"pretrained={pretrained!r} is not a local folder and could not be loaded as a hub repo: {error}"
        ) from None
    if "mm_vision_tower" in config:
        raise ValueError(CONVERT_HINT.format(path=pretrained))
    return str(config.get("model_type", ""))


def _require_type(pretrained: str, model_types: tuple[str, ...], model_name: str) -> None:
    found = _checkpoint_type(pretrained)
    if found not in model_types:
        raise ValueError(
            f"{model_name} loads {' / '.join(model_types)} checkpoints in the transformers format; "
            f"{pretrained} has model_type {found!r}"
        )


def _torch_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """`dtype` as `from_pretrained` takes it: "auto" (the checkpoint's own) or a floating-point torch dtype, given
    as one or by its name in torch ("float32", "bfloat16", "float16")."""
    if dtype == "auto":
        return dtype
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not auto or a floating-point torch dtype (float32, bfloat16, float16)")
    return resolved


class _LoadsIn:
    """Stands in for the model class a parent loads, so that it loads in `dtype` whatever dtype the parent asks."""

    def __init__(self, model_class: Any, dtype: str | torch.dtype) -> None:
        self.model_class = model_class
        self.dtype = dtype

    def from_pretrained(self, pretrained: str, **kwargs: Any):
        kwargs.pop("torch_dtype", None)
        return self.model_class.from_pretrained(pretrained, **{**kwargs, "dtype": self.dtype})


@contextlib.contextmanager
def _replaced(module: Any, name: str, value: Any):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _placement(device: str | None, device_map: str | None) -> tuple[str, str | None]:
    """The parents default to CUDA, and `llava_hf` to `device_map=""`, which transformers 5 rejects: follow the
    device_map when one is given, else use CUDA when present, else the CPU."""
    if not device:
        if device_map and device_map != "auto":
            device = device_map
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device_map and PartialState().num_processes == 1:
        device_map = device
    return device, device_map


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [item for visual in visuals for item in _flatten(visual)]


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class _IllavaRequests:
    """Request loops for the iLLaVA models; the parent class provides loading, `model`, `batch_size`, `rank`."""

    default_max_new_tokens = 128
    system_prompt: str | None = None
    reasoning_prompt: str | None = None
    fps: float | None = None

    def _attach_illava(self, config: IllavaConfig, processor: Any, frames: int) -> None:
        self.illava_config = config
        self._illava_processor = processor
        self._frames = frames  # frames sampled per video
        processor.tokenizer.padding_side = "left"  # batched generation continues every row at the same column
        illava.apply(self.model, config, processor=processor)
        # lmms-eval's console shows its loguru logger, not the logging module's
        eval_logger.info(f"iLLaVA on {type(self.model).__name__}: {config.summary()}")

    # -- prompts and inputs -----------------------------------------------------------------------------------

    def _content(self, context: str, visuals: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Chat content and the visuals in prompt order: images go to the context's `<image>` / `<image N>` markers
        when the markers match the images one to one, otherwise all visuals go first (the parents' conventions)."""
        markers = list(_IMAGE_MARKER.finditer(context))
        order = [int(m.group(1)) - 1 if m.group(1) else i for i, m in enumerate(markers)]
        if not markers or any(isinstance(v, str) for v in visuals) or sorted(order) != list(range(len(visuals))):
            media = [{"type": "video" if isinstance(v, str) else "image"} for v in visuals]
            text = _IMAGE_MARKER.sub("", context) if visuals else context
            return media + [{"type": "text", "text": text}], visuals
        content: list[dict[str, Any]] = []
        start = 0
        for marker in markers:
            content += [{"type": "text", "text": context[start : marker.start()]}, {"type": "image"}]
            start = marker.end()
        content.append({"type": "text", "text": context[start:]})
        return [part for part in content if part.get("text", True)], [visuals[i] for i in order]

    def _prompt(self, context: str, visuals: list[Any]) -> tuple[str, list[Any]]:
        if self.reasoning_prompt:
            context = context.strip() + self.reasoning_prompt
        content, visuals = self._content(context, visuals)
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": content})
        return self._chat_prompt(messages), visuals

    def _chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self._illava_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _media(self, visuals: list[Any]) -> dict[str, Any]:
        """The processor's image / video arguments for a batch's visuals in prompt order (a str is a video path)."""
        images = [visual for visual in visuals if not isinstance(visual, str)]
        videos = [read_video(path, num_frm=self._frames, fps=self.fps) for path in visuals if isinstance(path, str)]
        return {"images": images or None, "videos": videos or None}

    def _encode(self, prompts: list[str], visuals: list[list[Any]]):
        media = self._media([visual for row in visuals for visual in row])
        inputs = self._illava_processor(text=prompts, padding=True, return_tensors="pt", **media)
        return inputs.to(self.model.device, self.model.dtype)

    def _docs(self, doc_ids, tasks, splits) -> list[Any]:
        return [self.task_dict[task][split][doc_id] for doc_id, task, split in zip(doc_ids, tasks, splits)]

    # -- generation -------------------------------------------------------------------------------------------

    def _generate(self, contexts: list[str], visuals: list[list[Any]], gen_kwargs: dict[str, Any]):
        """Greedy or sampled generation for one batch; returns the texts and their merge reports."""
        prompts, ordered = zip(*(self._prompt(context, row) for context, row in zip(contexts, visuals)))
        inputs = self._encode(list(prompts), list(ordered))
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0)
        settings: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.default_max_new_tokens)),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            settings.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
        tokenizer = self._illava_processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            output = self.model.generate(**inputs, **settings, use_cache=self.use_cache, pad_token_id=pad)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = [_cut(text, until) for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        counts = [
            MergeReport(input_tokens=int(mask.sum()), output_tokens=int((row != pad).sum()), illava=report)
            for mask, row, report in zip(
                inputs["attention_mask"], new_tokens, merge_reports(self.model, inputs["input_ids"])
            )
        ]
        return texts, counts

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        tokenizer = self._illava_processor.tokenizer
        # longest prompts first, grouped by generation settings (lmms-eval's own batching helper)
        collator = utils.Collator(
            [request.args for request in requests],
            lambda args: (-len(tokenizer.encode(args[0])), args[0]),
            grouping=True,
        )
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            docs = self._docs(doc_ids, tasks, splits)
            visuals = [_flatten(to_visual(doc)) for to_visual, doc in zip(doc_to_visual, docs)]
            texts, counts = self._generate(list(contexts), visuals, all_gen_kwargs[0])
            for context, text, count in zip(contexts, texts, counts):
                results.append(GenerationResult(text=text, token_counts=count))
                self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), text)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[GenerationResult]:
        """Rounds as lmms-eval's multi-round tasks define them: after each round the task's `doc_to_text(doc,
        previous_output=..., round_idx=..., previous_round_info=...)` returns `(visuals, context, terminal,
        round outputs, round info)`; each request stops at its own terminal signal. The result is the list of
        round outputs, with one merge report per round."""
        results: list[GenerationResult] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        batch = self.batch_size
        for start in range(0, len(requests), batch):
            chunk = [request.args for request in requests[start : start + batch]]
            contexts, all_gen_kwargs, doc_to_visual, doc_to_text, doc_ids, tasks, splits = zip(*chunk)
            docs = self._docs(doc_ids, tasks, splits)
            state = [
                {"context": context, "visuals": _flatten(to_visual(doc)), "outputs": [], "info": None, "reports": []}
                for context, to_visual, doc in zip(contexts, doc_to_visual, docs)
            ]
            active = list(range(len(state)))
            round_idx = 0
            while active:
                texts, counts = self._generate(
                    [state[i]["context"] for i in active], [state[i]["visuals"] for i in active], all_gen_kwargs[0]
                )
                round_idx += 1
                still_active = []
                for i, text, count in zip(active, texts, counts):
                    entry = state[i]
                    entry["outputs"].append(text)
                    entry["reports"].append(count.illava)
                    visuals, context, terminal, outputs, info = doc_to_text[i](
                        docs[i],
                        previous_output=entry["outputs"],
                        round_idx=round_idx,
                        previous_round_info=entry["info"],
                    )
                    entry.update(outputs=list(outputs), info=info, context=context, visuals=_flatten(visuals))
                    if not terminal:
                        still_active.append(i)
                active = still_active
            for entry in state:
                report = MergeReport(illava=entry["reports"])
                results.append(GenerationResult(text=entry["outputs"], token_counts=report))
            progress.update(len(chunk))
        progress.close()
        return results

    # -- scoring ----------------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request `(mean negative log-likelihood of the continuation, whether greedy decoding produces it)`.

        The first value is a loss, as in lmms-eval's own models: its multiple_choice scoring takes the argmin.
        The pair travels as `GenerationResult.text` because lmms-eval 0.7 turns a bare tuple into its string,
        and the result's token counts carry the merge report.
        """
        tokenizer = self._illava_processor.tokenizer
        results: list[GenerationResult] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for start in range(0, len(requests), self.batch_size):
            chunk = [request.args for request in requests[start : start + self.batch_size]]
            prompts, continuations, visuals = [], [], []
            for context, target, to_visual, doc_id, task, split in chunk:
                doc = self.task_dict[task][split][doc_id]
                prompt, ordered = self._prompt(context, _flatten(to_visual(doc)))
                prompts.append(prompt)
                continuations.append(target if isinstance(target, str) else target(doc))
                visuals.append(ordered)
            # Counted on the text: the placeholders the processor expands all sit in the prompt part.
            lengths = [
                len(tokenizer(prompt + continuation, add_special_tokens=False).input_ids)
                - len(tokenizer(prompt, add_special_tokens=False).input_ids)
                for prompt, continuation in zip(prompts, continuations)
            ]
            if min(lengths) < 1:
                raise ValueError(f"empty continuation in loglikelihood request(s): {continuations}")
            inputs = self._encode([p + c for p, c in zip(prompts, continuations)], visuals)
            # every candidate continuation of a context sees the merge the context alone gets (left padding: the
            # context of row b ends `lengths[b]` tokens before the end)
            context_ends = inputs["input_ids"].shape[1] - torch.tensor(lengths, device=inputs["input_ids"].device)
            with torch.inference_mode(), illava.prompt_ends(self.model, context_ends):
                logits = self.model(**inputs, use_cache=False, logits_to_keep=max(lengths) + 1).logits.float()
            reports = merge_reports(self.model, inputs["input_ids"])
            for row, length in enumerate(lengths):
                targets = inputs["input_ids"][row, -length:]
                logprobs = torch.log_softmax(logits[row, -length - 1 : -1], dim=-1)
                loss = -logprobs.gather(-1, targets[:, None]).mean()
                greedy = bool((logprobs.argmax(dim=-1) == targets).all())
                count = MergeReport(input_tokens=int(inputs["attention_mask"][row].sum()), illava=reports[row])
                results.append(GenerationResult(text=(float(loss), greedy), token_counts=count))
            progress.update(len(chunk))
        progress.close()
        return results


class LlavaOneVisionTrainingFree(_IllavaRequests, LlavaHf):
    """`llava_onevision_training_free`: LLaVA-OneVision checkpoints in the transformers format
    (`LlavaOnevisionForConditionalGeneration`, e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf).

    Takes `llava_hf`'s arguments (`dtype`, checked by name, `attn_implementation`, `max_frames_num`, ...), the
    `illava_*` options, a `system_prompt` and the reference's loader arguments, accepted for command-line compatibility:
    `conv_template` (the checkpoint's chat template is used; `system_prompt` defaults to the system line of the
    reference's `qwen_1_5` template), `model_name` (the reference picks its loader by name; the config decides
    here); `mm_spatial_pool_stride` (2: transformers' 2x2 video pooling, 1: every frame token kept) is honoured.
    """

    default_max_new_tokens = 1024  # llava_hf's default

    def __init__(
        self,
        pretrained: str = "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        conv_template: str | None = "qwen_1_5",
        model_name: str | None = None,
        mm_spatial_pool_stride: int = 2,
        system_prompt: str | None = "You are a helpful assistant.",
        device: str | None = None,
        device_map: str = "",
        dtype: str | torch.dtype = "auto",
        **kwargs: Any,
    ) -> None:
        dtype = _torch_dtype(dtype)
        config = IllavaConfig.pop_from(kwargs)
        _require_type(pretrained, ("llava_onevision",), "llava_onevision_training_free")
        if int(mm_spatial_pool_stride) < 1:
            raise ValueError(f"mm_spatial_pool_stride={mm_spatial_pool_stride} must be a positive integer")
        eval_logger.info(  # lmms-eval's console shows its loguru logger only
            f"conv_template={conv_template}, model_name={model_name} are reference-only; the checkpoint's chat "
            "template is used"
        )
        device, device_map = _placement(device, device_map)
        super().__init__(pretrained=pretrained, device=device, device_map=device_map, dtype=dtype, **kwargs)
        self.system_prompt = system_prompt
        if self.chat_template is not None:  # llava_hf's `chat_template` argument
            self._image_processor.chat_template = self.chat_template
        if int(mm_spatial_pool_stride) != 2:
            self.model.config.mm_spatial_pool_stride = int(mm_spatial_pool_stride)  # read by illava.apply
        self._attach_illava(config, self._image_processor, self.max_frames_num)


class _QwenTrainingFree(_IllavaRequests):
    """Shared constructor of the Qwen models: `dtype` as `llava_onevision_training_free` takes it (the parents
    hard-code theirs and refuse the argument); the parent takes all remaining arguments (`min_pixels`,
    `max_pixels`, `max_num_frames`, `system_prompt`, ...)."""

    model_types: tuple[str, ...] = ()
    registered_name = ""
    parent_module: Any = None  # the parent's lmms-eval module, whose global `model_class_name` the parent loads
    model_class_name = ""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        device_map: str | None = None,
        dtype: str | torch.dtype = "auto",
        **kwargs: Any,
    ):
        dtype = _torch_dtype(dtype)
        config = IllavaConfig.pop_from(kwargs)
        _require_type(pretrained, self.model_types, self.registered_name)
        device, device_map = _placement(device, device_map)
        with self._parent_loads_in(dtype):
            super().__init__(pretrained=pretrained, device=device, device_map=device_map, **kwargs)
        self._attach_illava(config, self.processor, self.max_num_frames)

    def _parent_loads_in(self, dtype: str | torch.dtype) -> contextlib.AbstractContextManager:
        model_class = getattr(self.parent_module, self.model_class_name)
        return _replaced(self.parent_module, self.model_class_name, _LoadsIn(model_class, dtype))


class Qwen25VLTrainingFree(_QwenTrainingFree, lmms_qwen2_5_vl.Qwen2_5_VL):
    """`qwen2_5_vl_training_free`: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`)."""

    model_types = ("qwen2_5_vl",)
    registered_name = "qwen2_5_vl_training_free"
    parent_module = lmms_qwen2_5_vl
    model_class_name = "Qwen2_5_VLForConditionalGeneration"

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", **kwargs: Any) -> None:
        super().__init__(pretrained, **kwargs)


class Qwen2VLTrainingFree(_QwenTrainingFree, lmms_qwen2_vl.Qwen2_VL):
    """`qwen2_vl_training_free`: Qwen2-VL; lmms-eval hands Qwen2.5-VL checkpoints to `Qwen25VLTrainingFree`."""

    model_types = ("qwen2_vl",)
    registered_name = "qwen2_vl_training_free"
    parent_module = lmms_qwen2_vl
    model_class_name = "Qwen2VLForConditionalGeneration"

    def __init__(self, pretrained: str = "Qwen/Qwen2-VL-7B-Instruct", **kwargs: Any) -> None:
        super().__init__(pretrained, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        """lmms-eval builds models through this: pick the class whose parent loads the checkpoint's architecture."""
        pretrained = utils.simple_parse_args_string(arg_string).get("pretrained", "Qwen/Qwen2-VL-7B-Instruct")
        if cls is Qwen2VLTrainingFree and _checkpoint_type(str(pretrained)) in Qwen25VLTrainingFree.model_types:
            return Qwen25VLTrainingFree.create_from_arg_string(arg_string, additional_config)
        return super().create_from_arg_string(arg_string, additional_config)


class Qwen3VLTrainingFree(_QwenTrainingFree, lmms_qwen3_vl.Qwen3_VL):
    """`qwen3_vl_training_free`: Qwen3-VL and Qwen3-VL-MoE (`Qwen3VLForConditionalGeneration`,
    `Qwen3VLMoeForConditionalGeneration`, chosen by the checkpoint's model_type).

    Images and videos are prepared as the parent prepares them: qwen-vl-utils resizes images within
    `min_pixels` / `max_pixels` and samples `max_num_frames` frames per video (or `fps` frames a second), and
    the processor receives them as they are, with each video's fps and frame indices for its `<t seconds>`
    timestamps. `enable_thinking` reaches the chat template and the thinking is cut from the answers, as there.
    """

    model_types = ("qwen3_vl", "qwen3_vl_moe")
    registered_name = "qwen3_vl_training_free"

    def __init__(self, pretrained: str = "Qwen/Qwen3-VL-8B-Instruct", **kwargs: Any) -> None:
        require_package("qwen_vl_utils", feature="qwen3_vl_training_free (it reads images and videos with it)")
        super().__init__(pretrained, **kwargs)

    def _parent_loads_in(self, dtype: str | torch.dtype) -> contextlib.AbstractContextManager:
        """The parent loads the MoE class only when the checkpoint's *name* has an "A<n>B" part
        (Qwen/Qwen3-VL-30B-A3B-Instruct): a local copy in another folder would load as the dense model, its expert
        weights dropped and its MLPs random. While the parent loads, the config's model_type decides instead."""
        resolve = lmms_qwen3_vl._resolve_model_class

        def by_model_type(pretrained: str, _name_says_moe: bool):
            model_class, dtype_key = resolve(pretrained, _checkpoint_type(pretrained).endswith("_moe"))
            return _LoadsIn(model_class, dtype), dtype_key

        return _replaced(lmms_qwen3_vl, "_resolve_model_class", by_model_type)

    def _chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self._apply_chat_template(messages)  # the parent's: passes enable_thinking to the template

    def _media(self, visuals: list[Any]) -> dict[str, Any]:
        if not visuals:
            return {}
        from qwen_vl_utils import process_vision_info

        content = [
            {"type": "video", "video": visual, **self._video_sampling(visual)}
            if isinstance(visual, str)
            else {"type": "image", "image": visual, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
            for visual in visuals
        ]
        images, videos, video_options = process_vision_info(
            [{"role": "user", "content": content}],
            return_video_kwargs=True,
            image_patch_size=self._illava_processor.image_processor.patch_size,
            return_video_metadata=True,
        )
        media = {"images": images, "do_resize": False, **video_options}  # sized already, frames sampled already
        if videos:
            frames, metadata = zip(*videos)
            media.update(videos=list(frames), video_metadata=list(metadata))
        return media

    def _video_sampling(self, path: str) -> dict[str, Any]:
        """The parent's per-video settings; a frame count is capped to the video's frames, rounded down to the
        even count qwen-vl-utils requires (it refuses more frames than the video has)."""
        sampling = self._build_video_kwargs()
        if "nframes" in sampling:
            frames = len(decord.VideoReader(path))
            sampling["nframes"] = min(sampling["nframes"], frames - frames % 2)
        return sampling

    def _generate(self, contexts: list[str], visuals: list[list[Any]], gen_kwargs: dict[str, Any]):
        texts, counts = super()._generate(contexts, visuals, gen_kwargs)
        return [self._strip_thinking(text) for text in texts], counts


class Qwen35TrainingFree(Qwen3VLTrainingFree, lmms_qwen3_5.Qwen3_5):
    """`qwen3_5_training_free`: Qwen3.5 and Qwen3.5-MoE (`Qwen3_5ForConditionalGeneration`,
    `Qwen3_5MoeForConditionalGeneration`, chosen by the checkpoint's model_type), with lmms-eval's `qwen3_5`
    defaults (pixels, frames, thinking on); otherwise as `qwen3_vl_training_free`. Its LLM stage merges at layers
    after the first full-attention layer (3)."""

    model_types = ("qwen3_5", "qwen3_5_moe")
    registered_name = "qwen3_5_training_free"

    def __init__(self, pretrained: str = "Qwen/Qwen3.5-4B", **kwargs: Any) -> None:
        super().__init__(pretrained, **kwargs)
