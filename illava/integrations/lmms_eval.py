"""lmms-eval integration: iLLaVA models registered through the `lmms_eval.models` entry-point group.

    lmms-eval --model llava_onevision_training_free \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,enable_illava_vit=True,illava_vit_k=5-6-7-8 \\
        --tasks mme --batch_size 1 --log_samples --output_path ./logs

lmms-eval imports the entry point `illava.integrations.lmms_eval:model_manifests` while it builds its model
registry, so this module stays light: the model classes (`LlavaOneVisionTrainingFree`, `Qwen2VLTrainingFree`,
`Qwen25VLTrainingFree`, `Qwen3VLTrainingFree` for Qwen3-VL and Qwen3-VL-MoE, `Qwen35TrainingFree` for Qwen3.5 and
Qwen3.5-MoE) live in `_lmms_eval_models` and are imported on first access, which is when lmms-eval instantiates
one. Their parents, lmms-eval's transformers-based `llava_hf` / `qwen2_vl` / `qwen2_5_vl` / `qwen3_vl` / `qwen3_5`,
import `decord` at module level; a missing package is reported
with the command that installs it.
"""

from __future__ import annotations

import importlib
from typing import Any

MODEL_CLASSES = {
    "llava_onevision_training_free": "LlavaOneVisionTrainingFree",
    "qwen2_vl_training_free": "Qwen2VLTrainingFree",  # Qwen2-VL, and Qwen2.5-VL checkpoints dispatched by type
    "qwen2_5_vl_training_free": "Qwen25VLTrainingFree",
    "qwen3_vl_training_free": "Qwen3VLTrainingFree",  # Qwen3-VL and Qwen3-VL-MoE
    "qwen3_5_training_free": "Qwen35TrainingFree",  # Qwen3.5 and Qwen3.5-MoE
}

INSTALL_HINT = "pip install 'illava[lmms]'  (lmms-eval, decord, qwen-vl-utils)"


def model_manifests() -> list[Any]:
    """The payload of the `lmms_eval.models` entry point: one `ModelManifest` per model name (simple models,
    i.e. prompts come from the task's `doc_to_text` / `doc_to_visual`, as in the reference implementation)."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ModuleNotFoundError as error:
        raise ImportError(f"{error.name} is not installed; {INSTALL_HINT}") from error
    return [
        ModelManifest(model_id=name, simple_class_path=f"{__name__}.{class_name}")
        for name, class_name in MODEL_CLASSES.items()
    ]


def __getattr__(name: str) -> Any:
    if name not in MODEL_CLASSES.values():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__package__}._lmms_eval_models")
    except ModuleNotFoundError as error:
        if error.name is None or error.name.startswith("illava"):
            raise
        raise ImportError(
            f"{name} needs {error.name!r}, which lmms-eval's transformers-based models import; {INSTALL_HINT}"
        ) from error
    return getattr(module, name)
