"""Per-instance patch bookkeeping: everything `apply` changes is recorded here so `remove` can undo it exactly."""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Callable
from typing import Any

from .config import IllavaConfig
from .trace import IllavaTrace

STATE_ATTRIBUTE = "_illava_state"
_MISSING = object()


class IllavaState:
    """Lives on a patched model as `model._illava_state`; holds the config, the trace and the undo log.

    The patches keep the running call's state on the instance, so calls run one at a time (`lock`, held by every
    entry point: forward, generate, the feature getters); each thread sees the trace of its own last call."""

    def __init__(self, config: IllavaConfig):
        self.config = config
        self.lock = threading.RLock()
        self._per_thread = threading.local()
        self.processor: Any = None  # the processor passed to apply, if any
        self.language_merger: Any = None  # the LLM stage, when on
        self._hooks: list[Any] = []
        self._attributes: list[tuple[Any, str, Any]] = []

    @property
    def trace(self) -> IllavaTrace:
        """What this thread's last call recorded."""
        trace = getattr(self._per_thread, "trace", None)
        if trace is None:
            trace = self._per_thread.trace = IllavaTrace()
        return trace

    @trace.setter
    def trace(self, trace: IllavaTrace) -> None:
        self._per_thread.trace = trace

    def one_call_at_a_time(self, module: Any) -> None:
        """Hold `lock` while `module` runs a forward (hooks: they compose with any wrapper already there), and
        while it runs `generate` (its encoding before the prefill and its steps belong to one call)."""
        depth = threading.local()  # this thread's nested forwards of `module` holding the lock

        def enter(unused_module, unused_args):
            self.lock.acquire()
            depth.value = getattr(depth, "value", 0) + 1

        def leave(unused_module, unused_args, unused_output):
            if getattr(depth, "value", 0):  # a hook before `enter` may have failed: nothing to release then
                depth.value -= 1
                self.lock.release()

        self.add_hook(module.register_forward_pre_hook(enter, prepend=True))
        self.add_hook(module.register_forward_hook(leave, always_call=True))
        if hasattr(module, "generate"):
            def generate(unused_module, original, *args, **kwargs):
                with self.lock:
                    return original(*args, **kwargs)

            self.override_method(module, "generate", generate)

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute, remembering whether the instance had its own value before."""
        if name == "forward":
            _refuse_hub_kernel_layer(obj)
        self._attributes.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def override_method(self, obj: Any, name: str, function: Callable) -> None:
        """Bind `function(obj, original, *args, **kwargs)` as `obj.name` on this instance only."""
        original = getattr(obj, name)

        # Keep the original signature visible: generate() inspects `get_*_features` to pick its arguments.
        @functools.wraps(getattr(original, "__func__", original))
        def method(self_obj, *args, **kwargs):
            return function(self_obj, original, *args, **kwargs)

        self.set_attribute(obj, name, types.MethodType(method, obj))

    @contextlib.contextmanager
    def unpatched(self, obj: Any):
        """Inside the block, `obj` has the instance attributes it had before `apply` (e.g. to save it as it was)."""
        originals: dict[str, Any] = {}
        for owner, name, previous in self._attributes:
            if owner is obj and name not in originals:
                originals[name] = previous
        current = {name: obj.__dict__[name] for name in originals if name in obj.__dict__}
        for name, previous in originals.items():
            _restore(obj, name, previous)
        try:
            yield obj
        finally:
            for name, value in current.items():
                setattr(obj, name, value)

    def add_hook(self, handle: Any) -> None:
        self._hooks.append(handle)

    def undo(self) -> None:
        for handle in reversed(self._hooks):
            handle.remove()
        for obj, name, previous in reversed(self._attributes):
            _restore(obj, name, previous)
        self._hooks.clear()
        self._attributes.clear()


def _refuse_hub_kernel_layer(module: Any) -> None:
    """Hub kernels (the `kernels` library; transformers >= 5.25 applies them in `from_pretrained` by default and
    again on every `train()` / `eval()`) replace or reset the instance `forward` of each module whose class is
    decorated for them: a merging forward installed there would be dropped silently."""
    layer_name = getattr(type(module), "kernel_layer_name", None)
    if layer_name is not None:
        raise RuntimeError(
            f"illava: {type(module).__name__} is a hub-kernel layer ({layer_name!r}): transformers' kernelization "
            "replaces its forward, which illava's merge must replace too; load the model with use_kernels=False "
            "(or set USE_HUB_KERNELS=0) to merge in it"
        )


def _restore(obj: Any, name: str, previous: Any) -> None:
    if previous is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, previous)
