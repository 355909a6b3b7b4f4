"""illava: training-free visual-token merging (iLLaVA) for vision-language models on stock transformers."""

from .api import applied, apply, is_applied, last_trace, prompt_ends, remove
from .config import IllavaConfig
from .registry import Family, find_family, register_family
from .trace import IllavaTrace, VisionTrace

__all__ = [
    "Family", "IllavaConfig", "IllavaTrace", "VisionTrace", "applied", "apply", "find_family", "is_applied", "last_trace",
    "prompt_ends", "register_family", "remove",
]
__version__ = "0.1.0"
