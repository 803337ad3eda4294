"""The adapter pool: ONE copy of the base model serving many deployed adapters.

Memory: the base model's body tensors are loaded once. Plain LoRA adapters with the same number of labels live
in one `PeftModel` (`load_adapter(dir, adapter_name=name)`), each with its own head copy (peft's
ModulesToSaveWrapper keeps one per adapter), and a batch mixing them runs as ONE forward through peft's
mixed-batch inference (`adapter_names=[...]`). Every other adapter (DoRA and LoRA on a base whose head peft wraps
whole, e.g. RoBERTa's dense + out_proj, which peft cannot mix: `mixes_adapters_in_one_batch`; IA3, AdaLoRA,
prompt methods, peftkit bottleneck adapters; LoRA with another label count) gets its own host model whose
body *shares the same tensors* as the base (only its head and adapter weights are new), and is run as its own
grouped forward. Only methods whose weights overwrite base parameters (full fine-tuning, BitFit) need a private
copy of the base: one full model per such adapter.

Precision: the pool runs on the CPU in the precision `peftkit predict` would use (`precision.resolve_bf16`: bf16
autocast where it pays, unless told), decided once at start-up, for the mixed and the grouped forwards alike.
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

from peftkit.artifacts import attach, check_files, check_peft_keys, load_error_text, verify_base
from peftkit.data import EncodedSplit, collate, encode
from peftkit.errors import PeftkitError
from peftkit.formats import AdapterMeta
from peftkit.inference import format_predictions, predict_logits
from peftkit.modeling import (
    head_modules,
    load_model,
    load_tokenizer,
    mixes_adapters_in_one_batch,
    resolve_model_path,
)
from peftkit.pooling import apply_pooling
from peftkit.precision import autocast, resolve_bf16
from peftkit.predict import BrokenAdapterError, check_finite

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

    def describe(self, private: bool = True) -> dict[str, Any]:
        """What GET /v1/adapters shows; server-side paths only when `private` (admin token given)."""
        out = {
            "name": self.name,
            "method": self.meta.method,
            "task": self.meta.task.name,
            "labels": self.label_names,
            "is_pair": self.is_pair,
            "metrics": self.meta.metrics,
            "mixed_batch": self.host.startswith("lora-"),
        }
        if private:
            out.update(base_model=self.meta.base_model, path=self.path)
        else:  # a task given as a file or folder keeps only its last name
            out["task"] = Path(self.meta.task.name).name or self.meta.task.name
        return out


@dataclass
class HostModel:
    """A model object running one or more deployments. `mixed`: a peft LoRA PeftModel usable with adapter_names."""

    model: nn.Module
    mixed: bool
    deployments: set[str] = field(default_factory=set)


class AdapterPool:
    """Loads the base once and attaches, detaches and runs adapters on it. Not async; thread-safe: add/remove
    take `admin_lock` and `lock` themselves, predict callers hold `lock`. `bf16`: autocast or not; None = where it
    pays on this CPU (the rule predict follows), resolved here into `self.bf16`."""

    def __init__(self, base: str = "default", allow_base_mismatch: bool = False, bf16: bool | None = None):
        from peftkit.config import ModelConfig

        self.base = base
        self.device = torch.device("cpu")
        self.bf16 = resolve_bf16(bf16, self.device)
        self.allow_base_mismatch = allow_base_mismatch
        self.model_cfg = ModelConfig(name_or_path=base, pooling="pooler")  # stock body; adapters apply their pooling
        self.model_path = resolve_model_path(base)
        self.tokenizer = load_tokenizer(self.model_cfg)
        self.template = load_model(self.model_cfg, 2, self.tokenizer.pad_token_id).eval()
        self.heads = head_modules(self.template)
        self.deployments: dict[str, Deployment] = {}
        self.hosts: dict[str, HostModel] = {}
        self.lock = threading.Lock()  # held while the models run or change
        self.admin_lock = threading.RLock()  # serialises add/remove (a load runs aside, outside `lock`)

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
        """Deploy the adapter folder at `path` under `name` (raises PeftkitError for a bad name, folder or base).

        Load aside, then swap: the adapter is built and checked on a scratch model (body tensors shared, so
        cheap) while requests keep running; only a folder that loaded completely is attached to the live
        models, under `lock`. A failed load leaves the pool exactly as it was."""
        with self.admin_lock:
            if not NAME_PATTERN.match(name or "") or name == "__base__":
                raise PeftkitError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' (no dots)")
            if name in self.deployments:
                raise AdapterExistsError(f"adapter {name!r} is already loaded; DELETE it first")
            directory = Path(path)
            try:
                return self._add(name, directory)
            except PeftkitError:
                raise
            except Exception as e:  # whatever a foreign folder makes peft/torch raise: the folder's fault
                raise PeftkitError(f"cannot load adapter {directory}: {load_error_text(e)}") from None

    def _add(self, name: str, directory: Path) -> Deployment:
        meta = AdapterMeta.read(directory)
        verify_base(meta, self.base, self.allow_base_mismatch)
        check_files(directory, meta)
        num_labels = len(meta.label_names)
        if meta.peft_format and meta.method == "lora":
            from peft import PeftModel

            key = f"lora-{num_labels}-{meta.pooling}"
            try:  # aside: a scratch PeftModel on shared body tensors
                base = apply_pooling(self.shared_model(num_labels), meta.pooling)
                scratch = PeftModel.from_pretrained(base, str(directory), adapter_name=name, is_trainable=False)
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
                raise PeftkitError(f"cannot load adapter {directory}: {load_error_text(e)}") from None
            check_peft_keys(scratch, directory, name)
            if not mixes_adapters_in_one_batch(scratch):  # a head peft wraps whole: its own grouped forward
                return self._host_alone(name, directory, meta, scratch)
            with self.lock:  # swap
                host = self.hosts.get(key)
                if host is None:
                    host = self.hosts[key] = HostModel(scratch.eval(), mixed=True)
                else:
                    try:
                        host.model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
                    except BaseException:
                        _purge(host.model, name)
                        raise
                    host.model.eval()
                host.deployments.add(name)
                deployment = self.deployments[name] = Deployment(name, str(directory), meta, key)
            return deployment
        base = (
            load_model(self.model_cfg, num_labels, self.tokenizer.pad_token_id)
            if self._writes_base(directory, meta)
            else self.shared_model(num_labels)
        )
        model, _ = attach(base, directory, meta, self.model_path)
        return self._host_alone(name, directory, meta, model)

    def _host_alone(self, name: str, directory: Path, meta: AdapterMeta, model: nn.Module) -> Deployment:
        """Deploy `name` on a host model of its own, run as its own grouped forward."""
        key = f"own-{name}"
        with self.lock:
            self.hosts[key] = HostModel(model.eval(), mixed=False, deployments={name})
            deployment = self.deployments[name] = Deployment(name, str(directory), meta, key)
        return deployment

    def remove(self, name: str) -> None:
        """Unload `name`; UnknownAdapterError when it is not (or no longer) loaded, so DELETE is idempotent."""
        with self.admin_lock, self.lock:
            deployment = self.deployments.pop(name, None)
            if deployment is None:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded")
            host = self.hosts[deployment.host]
            host.deployments.discard(name)
            if not host.deployments:
                del self.hosts[deployment.host]
            elif host.mixed:
                _purge(host.model, name, keep=sorted(host.deployments)[0])

    # ----------------------------------------------------------------------------------------- inference

    def encode_rows(self, deployment: Deployment, texts: list[str], pairs: list[str] | None) -> EncodedSplit:
        rows = [{"text": t, **({"text_pair": p} if pairs else {})} for t, p in zip(texts, pairs or texts)]
        return encode(rows, self.tokenizer, deployment.meta.task.max_length)

    @torch.inference_mode()
    def predict(
        self, jobs: list[tuple[str, list[str] | EncodedSplit, list[str] | None]], batch_size: int = 64
    ) -> list[list[dict[str, Any]] | Exception]:
        """Predictions for several (deployment name, texts or an already encoded split, pairs) jobs at once: one
        mixed forward per LoRA host model, one grouped forward per other deployment. A job whose adapter
        produced NaN/inf gets a BrokenAdapterError in its place; the other jobs are unaffected. Callers hold
        `lock`."""
        results: list[list[dict[str, Any]] | Exception | None] = [None] * len(jobs)
        by_host: dict[str, list[int]] = {}
        for i, (name, _, _) in enumerate(jobs):
            by_host.setdefault(self.deployments[name].host, []).append(i)
        for key, indices in by_host.items():
            host = self.hosts[key]
            splits = [
                jobs[i][1]
                if isinstance(jobs[i][1], EncodedSplit)
                else self.encode_rows(self.deployments[jobs[i][0]], jobs[i][1], jobs[i][2])
                for i in indices
            ]
            joined = _concat(splits)
            if host.mixed:
                names = [jobs[i][0] for i, s in zip(indices, splits) for _ in range(len(s))]
                with autocast(self.device, self.bf16):
                    logits = _mixed_logits(host.model, joined, names, batch_size)
            else:
                logits = predict_logits(host.model, joined, batch_size, self.device, self.bf16)
            start = 0
            for i, split in zip(indices, splits):
                chunk = logits[start : start + len(split)]
                start += len(split)
                name = jobs[i][0]
                try:
                    check_finite(chunk, repr(name))
                except BrokenAdapterError as e:
                    results[i] = e
                    continue
                results[i] = format_predictions(chunk, self.deployments[name].label_names)
        return results  # type: ignore[return-value]


class AdapterExistsError(PeftkitError):
    """POST of a name that is already deployed."""


class UnknownAdapterError(PeftkitError):
    """A name that is not (or no longer) deployed."""


def _purge(model: nn.Module, name: str, keep: str | None = None) -> None:
    """Remove every trace of adapter `name` from a shared LoRA PeftModel (also a half-loaded one)."""
    if name in getattr(model, "peft_config", {}):
        if keep is not None and model.active_adapter == name:
            model.set_adapter(keep)
        try:
            model.delete_adapter(name)
        except Exception:  # a half-injected adapter peft cannot delete: drop its modules by hand below
            model.peft_config.pop(name, None)
    for module in model.modules():
        for attr in (
            "lora_A",
            "lora_B",
            "lora_embedding_A",
            "lora_embedding_B",
            "lora_dropout",
            "modules_to_save",
            "lora_magnitude_vector",
        ):
            container = getattr(module, attr, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and name in container:
                del container[name]
        for attr in ("r", "lora_alpha", "scaling"):
            table = getattr(module, attr, None)
            if isinstance(table, dict):
                table.pop(name, None)


def _concat(splits: list[EncodedSplit]) -> EncodedSplit:
    keys = splits[0].features.keys()
    return EncodedSplit(
        {k: [row for s in splits for row in s.features[k]] for k in keys}, None, splits[0].pad_token_id
    )


def _mixed_logits(model: nn.Module, split: EncodedSplit, names: list[str], batch_size: int) -> torch.Tensor:
    """peft mixed-batch inference: row i goes through adapter names[i] (LoRA layers and its own head)."""
    out = []
    for start in range(0, len(split), batch_size):
        idx = list(range(start, min(start + batch_size, len(split))))
        batch = collate(split, idx)
        out.append(model(**batch, adapter_names=[names[i] for i in idx]).logits.float())
    return torch.cat(out)
