"""peftkit: parameter-efficient adaptation methods, one training loop, benchmark tables, shippable adapters."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "load_config", "train"]


def __getattr__(name: str):
    # Lazy: `import peftkit` (and `peftkit recipes`) stays fast; torch/transformers load on first use.
    if name == "load":
        from peftkit.artifacts import load

        return load
    if name == "train":
        from peftkit.train import train

        return train
    if name == "load_config":
        from peftkit.recipe_files import load_config

        return load_config
    raise AttributeError(name)
