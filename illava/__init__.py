"""illava: training-free visual-token merging (iLLaVA) for vision-language models on stock transformers."""

from .api import applied, apply, is_applied, last_trace, prompt_ends, remove
from .config import IllavaConfig
from .trace import IllavaTrace, VisionTrace

__all__ = [
    "IllavaConfig", "IllavaTrace", "VisionTrace", "applied", "apply", "is_applied", "last_trace", "prompt_ends", "remove",
]
__version__ = "0.1.0"
