"""Per-instance patch bookkeeping: everything `apply` changes is recorded here so `remove` can undo it exactly."""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

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
        self._forwards: list[tuple[Any, Any, Any]] = []  # (module, the installed forward, what it replaced)
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

        self.before_forward(module, enter, prepend=True)
        self.after_forward(module, leave, always_call=True)
        if hasattr(module, "generate"):
            def generate(unused_module, original, *args, **kwargs):
                with self.lock:
                    return original(*args, **kwargs)

            self.override_method(module, "generate", generate)

    def before_forward(self, module: Any, hook: Callable, *, with_kwargs: bool = False, prepend: bool = False) -> None:
        """`module.register_forward_pre_hook`, run eagerly (see `eager`), removed by `undo`."""
        self._hooks.append(module.register_forward_pre_hook(eager(hook), with_kwargs=with_kwargs, prepend=prepend))

    def after_forward(self, module: Any, hook: Callable, *, with_kwargs: bool = False, always_call: bool = False) -> None:
        """`module.register_forward_hook`, run eagerly (see `eager`), removed by `undo`."""
        self._hooks.append(
            module.register_forward_hook(eager(hook), with_kwargs=with_kwargs, always_call=always_call)
        )

    def install_forward(self, module: Any, forward: Callable) -> None:
        """Make `forward(module, *args, **kwargs)` what `module` computes, on this instance, beneath the wrappers
        accelerate puts there (`device_map` over devices, CPU / disk offload: `_hf_hook` around `_old_forward`),
        so their pre- and post-forward still run (inputs moved, offloaded weights loaded). It runs eagerly under
        torch.compile (see `eager`). `undo` finds it in either place, also when accelerate's hooks were added or
        removed after `apply`."""
        _refuse_hub_kernel_layer(module)
        own = module.__dict__
        if "_hf_hook" in own and "_old_forward" in own:
            place = "_old_forward"
        elif "forward" in own:
            raise RuntimeError(
                f"illava: this {type(module).__name__}'s forward is already replaced on the instance (by "
                f"{getattr(own['forward'], '__qualname__', type(own['forward']).__name__)}); illava must replace it "
                "to merge there: apply illava first and wrap after, or wrap with accelerate's add_hook_to_module, "
                "which illava keeps"
            )
        else:
            place = "forward"
        installed = types.MethodType(eager(forward), module)
        self._forwards.append((module, installed, own.get(place, _MISSING)))
        setattr(module, place, installed)

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute, remembering whether the instance had its own value before."""
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

    def undo(self) -> None:
        for handle in reversed(self._hooks):
            handle.remove()
        for module, installed, previous in reversed(self._forwards):
            _uninstall_forward(module, installed, previous)
        for obj, name, previous in reversed(self._attributes):
            _restore(obj, name, previous)
        self._hooks.clear()
        self._forwards.clear()
        self._attributes.clear()


def eager(function: Callable) -> Callable:
    """Run `function` as Python, outside any compiled graph: illava's hooks and merges hand state from one to the
    next (the q/k a merge scores, the survivors later blocks re-slice for) and merge data-dependently; dynamo
    does not carry such side effects across graph breaks on every torch release (torch 2.6 merged wrongly)."""
    return torch.compiler.disable(function)


def _uninstall_forward(module: Any, installed: Any, previous: Any) -> None:
    own = module.__dict__
    for place in ("forward", "_old_forward"):  # accelerate may have wrapped or unwrapped it since
        if own.get(place) is not installed:
            continue
        bound_class_forward = (getattr(previous, "__func__", None) is type(module).forward
                               and getattr(previous, "__self__", None) is module)
        if place == "forward" and (previous is _MISSING or bound_class_forward):
            del own[place]
        elif previous is _MISSING:  # installed before accelerate wrapped it: accelerate's wrapper stays
            setattr(module, place, types.MethodType(type(module).forward, module))
        else:
            setattr(module, place, previous)
        return


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
