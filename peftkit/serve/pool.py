"""The adapter pool: ONE copy of the base model serving many deployed adapters.

Memory: the base model's body tensors are loaded once. Plain LoRA adapters with the same number of labels live
in one `PeftModel` (`load_adapter(dir, adapter_name=name)`), each with its own head copy (peft's
ModulesToSaveWrapper keeps one per adapter), and a batch mixing them runs as ONE forward through peft's
mixed-batch inference (`adapter_names=[...]`). Every other adapter (DoRA, which peft cannot mix; IA3, AdaLoRA,
prompt methods, peftkit bottleneck adapters; LoRA with another label count) gets its own host model whose
body *shares the same tensors* as the base (only its head and adapter weights are new), and is run as its own
grouped forward. Only methods whose weights overwrite base parameters (full fine-tuning, BitFit) need a private
copy of the base: one full model per such adapter.
"""
from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.artifacts import attach, check_files, verify_base
from peftkit.data import EncodedSplit, collate, encode
from peftkit.errors import PeftkitError, short_error
from peftkit.formats import AdapterMeta
from peftkit.inference import format_predictions, predict_logits
from peftkit.modeling import head_modules, load_model, load_tokenizer, resolve_model_path
from peftkit.pooling import apply_pooling

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # peft adapter names become ModuleDict keys: no dots


@dataclass
class Deployment:
    """An adapter folder served under a name: what it expects, and which host model runs it."""

    name: str
    path: str
    meta: AdapterMeta
    host: str  # key of the HostModel that holds it

    @property
    def label_names(self) -> list[str]:
        return self.meta.label_names

    @property
    def is_pair(self) -> bool:
        return self.meta.task.is_pair

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.meta.method, "task": self.meta.task.name, "labels": self.label_names,
                "is_pair": self.is_pair, "metrics": self.meta.metrics, "base_model": self.meta.base_model,
                "mixed_batch": self.host.startswith("lora-"), "path": self.path}


@dataclass
class HostModel:
    """A model object running one or more deployments. `mixed`: a peft LoRA PeftModel usable with adapter_names."""

    model: nn.Module
    mixed: bool
    deployments: set[str] = field(default_factory=set)


class AdapterPool:
    """Loads the base once and attaches, detaches and runs adapters on it. Not async: callers hold `lock`."""

    def __init__(self, base: str = "default", allow_base_mismatch: bool = False):
        from peftkit.config import ModelConfig

        self.base = base
        self.allow_base_mismatch = allow_base_mismatch
        self.model_cfg = ModelConfig(name_or_path=base, pooling="pooler")  # stock body; adapters apply their pooling
        self.model_path = resolve_model_path(base)
        self.tokenizer = load_tokenizer(self.model_cfg)
        self.template = load_model(self.model_cfg, 2, self.tokenizer.pad_token_id).eval()
        self.heads = head_modules(self.template)
        self.deployments: dict[str, Deployment] = {}
        self.hosts: dict[str, HostModel] = {}
        self.lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- models

    def shared_model(self, num_labels: int) -> nn.Module:
        """A fresh *ForSequenceClassification object whose body tensors ARE the template's (no copy)."""
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(self.template.config)
        config.num_labels = num_labels
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
        for kind in ("parameters", "buffers"):
            for name, tensor in getattr(self.template, f"named_{kind}")(remove_duplicate=False):
                if name.split(".")[0] in self.heads:
                    continue
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                getattr(owner, f"_{kind}")[leaf] = tensor
        for head in self.heads:
            module = getattr(model, head).to_empty(device="cpu")
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
        leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftovers:  # an architecture with state outside named tensors: fall back to a private copy
            return load_model(self.model_cfg, num_labels, self.tokenizer.pad_token_id)
        return model.eval()

    def _writes_base(self, directory: Path, meta: AdapterMeta) -> bool:
        """True when the adapter's weights overwrite base parameters (full, BitFit): it needs a private base copy."""
        if meta.peft_format:
            return False
        from safetensors import safe_open

        from peftkit.adapters.base import WEIGHTS_FILE

        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
            keys = set(f.keys())
        body = {n for n, _ in self.template.named_parameters() if n.split(".")[0] not in self.heads}
        return bool(keys & body)

    # ----------------------------------------------------------------------------------------- deployments

    def add(self, name: str, path: str | Path) -> Deployment:
        """Deploy the adapter folder at `path` under `name` (raises PeftkitError for a bad name, folder or base)."""
        if not NAME_PATTERN.match(name or "") or name == "__base__":
            raise PeftkitError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' (no dots)")
        if name in self.deployments:
            raise PeftkitError(f"adapter {name!r} is already loaded; DELETE it first")
        directory = Path(path)
        meta = AdapterMeta.read(directory)
        verify_base(meta, self.base, self.allow_base_mismatch)
        check_files(directory, meta)
        num_labels = len(meta.label_names)
        is_lora = meta.peft_format and meta.method == "lora"
        try:
            if is_lora:
                key = f"lora-{num_labels}-{meta.pooling}"
                host = self.hosts.get(key)
                if host is None:
                    from peft import PeftModel

                    base = apply_pooling(self.shared_model(num_labels), meta.pooling)
                    model = PeftModel.from_pretrained(base, str(directory), adapter_name=name,
                                                      is_trainable=False)
                    host = self.hosts[key] = HostModel(model, mixed=True)
                else:
                    host.model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
            else:
                key = f"own-{name}"
                base = (load_model(self.model_cfg, num_labels, self.tokenizer.pad_token_id)
                        if self._writes_base(directory, meta) else self.shared_model(num_labels))
                model, _ = attach(base, directory, meta, self.model_path)
                host = self.hosts[key] = HostModel(model, mixed=False)
        except PeftkitError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise PeftkitError(f"cannot load adapter {directory}: {short_error(e)}") from None
        host.model.eval()
        host.deployments.add(name)
        deployment = self.deployments[name] = Deployment(name, str(directory), meta, key)
        return deployment

    def remove(self, name: str) -> None:
        deployment = self.deployments.pop(name)
        host = self.hosts[deployment.host]
        host.deployments.discard(name)
        if not host.deployments:
            del self.hosts[deployment.host]
        elif host.mixed:
            if name in host.model.peft_config and host.model.active_adapter == name:
                host.model.set_adapter(sorted(host.deployments)[0])
            host.model.delete_adapter(name)

    # ----------------------------------------------------------------------------------------- inference

    def encode_rows(self, deployment: Deployment, texts: list[str], pairs: list[str] | None) -> EncodedSplit:
        rows = [{"text": t, **({"text_pair": p} if pairs else {})} for t, p in zip(texts, pairs or texts)]
        return encode(rows, self.tokenizer, deployment.meta.task.max_length)

    @torch.inference_mode()
    def predict(self, jobs: list[tuple[str, list[str], list[str] | None]],
                batch_size: int = 64) -> list[list[dict[str, Any]]]:
        """Predictions for several (deployment name, texts, pairs) jobs at once: one mixed forward per LoRA host
        model, one grouped forward per other deployment."""
        results: list[list[dict[str, Any]] | None] = [None] * len(jobs)
        by_host: dict[str, list[int]] = {}
        for i, (name, _, _) in enumerate(jobs):
            by_host.setdefault(self.deployments[name].host, []).append(i)
        for key, indices in by_host.items():
            host = self.hosts[key]
            splits = [self.encode_rows(self.deployments[jobs[i][0]], jobs[i][1], jobs[i][2]) for i in indices]
            joined = _concat(splits)
            if host.mixed:
                names = [jobs[i][0] for i, s in zip(indices, splits) for _ in range(len(s))]
                logits = _mixed_logits(host.model, joined, names, batch_size)
            else:
                logits = predict_logits(host.model, joined, batch_size, torch.device("cpu"))
            start = 0
            for i, split in zip(indices, splits):
                chunk = logits[start:start + len(split)]
                start += len(split)
                results[i] = format_predictions(chunk, self.deployments[jobs[i][0]].label_names)
        return results  # type: ignore[return-value]


def _concat(splits: list[EncodedSplit]) -> EncodedSplit:
    keys = splits[0].features.keys()
    return EncodedSplit({k: [row for s in splits for row in s.features[k]] for k in keys}, None, splits[0].pad_token_id)


def _mixed_logits(model: nn.Module, split: EncodedSplit, names: list[str], batch_size: int) -> torch.Tensor:
    """peft mixed-batch inference: row i goes through adapter names[i] (LoRA layers and its own head)."""
    out = []
    for start in range(0, len(split), batch_size):
        idx = list(range(start, min(start + batch_size, len(split))))
        batch = collate(split, idx)
        out.append(model(**batch, adapter_names=[names[i] for i in idx]).logits.float())
    return torch.cat(out)
