"""Helpers shared by the export/predict/serve tests: train tiny runs once per module, compare logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ADALORA_TINY = {"tinit_ratio": 0.0, "tfinal_ratio": 0.0, "init_r": 4, "target_r": 2, "delta_t": 1}
# options a method needs to fit the tiny 32-wide models (MiSS defaults to r=64)
TINY_OPTIONS = {"adalora": {"tinit_ratio": 0.0, "tfinal_ratio": 0.0, "init_r": 4, "target_r": 2}, "miss": {"r": 8}}


class TinyRuns:
    """Lazily trains (and caches) tiny runs on the tiny BERT and the toy task."""

    def __init__(self, root: Path, model_dir: Path, task_dir: Path):
        self.root, self.model_dir, self.task_dir = root, model_dir, task_dir
        self.cache: dict[tuple, Path] = {}

    def run(
        self, method: str = "lora", seed: int = 0, task: Path | None = None, pooling: str = "auto", **options
    ) -> Path:
        """Train `method` (with `model.pooling`) for a few steps and return the RUN folder (adapter in RUN/adapter)."""
        from peftkit.config import RunConfig
        from peftkit.loop import train

        key = (method, seed, str(task), pooling, tuple(sorted(options.items())))
        if key not in self.cache:
            opts = {**(ADALORA_TINY if method == "adalora" else {}), **options}
            config = RunConfig.from_dict(
                {
                    "recipe": f"toy-{method}",
                    "task": {"name": str(task or self.task_dir), "max_length": 32},
                    "model": {"name_or_path": str(self.model_dir), "pooling": pooling},
                    "method": {"name": method, **opts},
                    "train": {
                        "max_steps": 4,
                        "batch_size": 8,
                        "lr": 1e-2,
                        "progress": False,
                        "log_every": 1,
                        "seed": seed,
                        "output_dir": str(self.root / "runs"),
                    },
                }
            )
            run_dir = self.root / "runs" / f"{method}-{seed}-{len(self.cache)}"
            train(config, run_dir=run_dir)
            self.cache[key] = run_dir
        return self.cache[key]


def three_label_task(root: Path, toy_task_dir: Path) -> Path:
    """The toy task with a third (unused) label name, so its heads have 3 outputs."""
    folder = root / "toy3"
    if not folder.exists():
        shutil.copytree(toy_task_dir, folder)
        (folder / "meta.json").write_text(json.dumps({"label_names": ["negative", "positive", "neutral"]}))
    return folder


TEXTS = ["the movie was great", "i found it boring", "acting was wonderful and the plot felt awful", "bad"]


def logits_of(model, tokenizer, texts=TEXTS, pairs=None):
    import torch

    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits.float()
