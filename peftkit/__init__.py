"""peftkit: parameter-efficient adaptation methods, one training loop, benchmark tables, shippable adapters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load", "load_config", "train"]

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors
    from peftkit.artifacts import load
    from peftkit.loop import train
    from peftkit.recipe_files import load_config


def __getattr__(name: str) -> Any:
    # Lazy: `import peftkit` (and `peftkit recipes`) stays fast; torch/transformers load on first use.
    if name == "load":
        from peftkit.artifacts import load

        return load
    if name == "train":
        from peftkit.loop import train

        return train
    if name == "load_config":
        from peftkit.recipe_files import load_config

        return load_config
    raise AttributeError(name)
