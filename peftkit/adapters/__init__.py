"""The method registry: names -> Method classes, built-ins plus third-party plugins.

Add a method: write `peftkit/adapters/<method>.py` (a config dataclass + a `Method` subclass) and add one line
to BUILTIN_METHODS. Third-party packages register under the entry-point group `peftkit.methods`:

    [project.entry-points."peftkit.methods"]
    mymethod = "mypackage.module:MyMethod"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from peftkit.adapters.base import Method, MethodContext
from peftkit.errors import PeftkitError, short_error, unknown_choice

ENTRY_POINT_GROUP = "peftkit.methods"

BUILTIN_METHODS: dict[str, str] = {
    "full": "peftkit.adapters.full:FullFineTuning",
    "head": "peftkit.adapters.head:HeadOnly",
    "bitfit": "peftkit.adapters.bitfit:BitFit",
    "bottleneck": "peftkit.adapters.bottleneck:BottleneckAdapter",
    "lora": "peftkit.adapters.lora:LoRA",
    "dora": "peftkit.adapters.dora:DoRA",
    "adalora": "peftkit.adapters.adalora:AdaLoRA",
    "ia3": "peftkit.adapters.ia3:IA3",
    "prompt": "peftkit.adapters.prompt:PromptTuning",
    "ptuning": "peftkit.adapters.ptuning:PTuning",
    "prefix": "peftkit.adapters.prefix:PrefixTuning",
    "vera": "peftkit.adapters.vera:VeRA",
    "loha": "peftkit.adapters.loha:LoHa",
    "lokr": "peftkit.adapters.lokr:LoKr",
    "oft": "peftkit.adapters.oft:OFT",
    "boft": "peftkit.adapters.boft:BOFT",
    "hra": "peftkit.adapters.hra:HRA",
    "fourierft": "peftkit.adapters.fourierft:FourierFT",
    "ln_tuning": "peftkit.adapters.ln_tuning:LNTuning",
    "miss": "peftkit.adapters.miss:MiSS",
    "peft": "peftkit.adapters.peft_generic:GenericPeft",  # any other peft tuner by peft_type
}

# Old method names, still accepted in configs and recipe names ("adapter" also names this package and shipped folders).
METHOD_ALIASES: dict[str, str] = {"adapter": "bottleneck"}

_registered: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a Method subclass under `cls.name` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method) and cls.name):
        raise PeftkitError(f"{cls!r} is not a peftkit Method with a name")
    _registered[cls.name] = cls
    return cls


def _plugin_targets() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_methods() -> list[str]:
    return sorted({*BUILTIN_METHODS, *_plugin_targets(), *_registered})


def get_method_class(name: str) -> type[Method]:
    name = METHOD_ALIASES.get(name, name)
    if name in _registered:
        return _registered[name]
    if name in BUILTIN_METHODS:
        cls = _import_target(BUILTIN_METHODS[name])
    elif name in (plugins := _plugin_targets()):
        cls = _load_plugin(name, plugins[name])
    else:
        raise unknown_choice("method", name, available_methods())
    return register_method(cls) if cls.name == name else cls


def _load_plugin(name: str, target: str) -> type[Method]:
    """Import a third-party method: its package's own bug (an import error, a wrong target) is one line naming the
    entry point, so the user knows which installed package to fix or uninstall."""
    where = f"third-party method {name!r} (entry point {target!r} in group {ENTRY_POINT_GROUP!r})"
    try:
        cls = _import_target(target)
    except Exception as e:  # a plugin's module may raise anything while importing
        raise PeftkitError(f"{where} could not be loaded: {short_error(e)}") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise PeftkitError(f"{where} is {cls!r}, not a peftkit.adapters.Method subclass")
    return cls


def _import_target(target: str) -> Any:
    """The object a `module:attribute` target names (a built-in method's, or an entry point's value)."""
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build_method(name: str, options=None) -> Method:
    return get_method_class(name)(options)


def apply_method(method, model, ctx):
    """`method.apply`, with a library's ValueError (peft: target modules not found, bad bias) or TypeError (peft: a
    layer type the tuner cannot adapt, e.g. GPT-2's Conv1D under BOFT) as one line."""
    try:
        return method.apply(model, ctx)
    except (ValueError, KeyError, TypeError) as e:
        targets = getattr(method.options, "target_modules", None)
        named = f" (target_modules={targets})" if targets is not None else ""
        raise PeftkitError(
            f"method {method.name!r} could not be applied to this model{named}: {short_error(e)}"
        ) from None


__all__ = [
    "METHOD_ALIASES",
    "Method",
    "MethodContext",
    "apply_method",
    "available_methods",
    "build_method",
    "get_method_class",
    "register_method",
]
