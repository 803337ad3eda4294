"""The adapter folder: what a run ships and what `peftkit.load` reads back.

Every folder has `peftkit.json` (method, options, base model, task labels and input fields). Weights are in
PEFT's own layout (`adapter_config.json` + `adapter_model.safetensors`, head included) for methods peft has, so
stock `peft.PeftModel.from_pretrained(base, folder)` loads them; otherwise in `peftkit_weights.safetensors`.
Only safetensors and JSON are read: no pickle, no code from the folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.adapters import Method, MethodContext, build_method, get_method_class
from peftkit.config import ModelConfig, build_dataclass
from peftkit.errors import PeftkitError, short_error
from peftkit.fingerprint import model_fingerprint, short
from peftkit.formats import ADAPTER_META_FILE, AdapterMeta, TaskInfo
from peftkit.io import atomic_directory, atomic_write_json, check_safetensors, read_json
from peftkit.modeling import (
    ParameterCount,
    head_modules,
    load_model,
    load_tokenizer,
    portable_model_name,
    resolve_model_path,
)
from peftkit.pooling import apply_pooling, pooling_of


def save_adapter(model: nn.Module, method: Method, directory: Path, *, base_model: str, task: TaskInfo,
                 metrics: dict[str, Any] | None = None, params: ParameterCount | None = None,
                 head_modules: list[str] | None = None) -> AdapterMeta:
    """Write the adapter folder atomically: either the whole folder appears, or nothing changes."""
    directory = Path(directory)
    with atomic_directory(directory, overwrite=True) as tmp:
        method.save(model, tmp)
        if method.uses_peft:
            set_peft_base_name(tmp, base_model)
        meta = AdapterMeta(
            method=method.name, method_options=dataclasses.asdict(method.options), peft_format=method.uses_peft,
            base_model=portable_model_name(base_model), base_fingerprint=model_fingerprint(base_model), task=task,
            metrics=metrics, adapter_bytes=sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
            pooling=pooling_of(model), head_modules=head_modules,
            **({"trainable_params": params.trainable, "total_params": params.total,
                "trainable_pct": round(params.trainable_pct, 4)} if params else {}),
        )
        meta.write(tmp)
    return meta


def set_peft_base_name(directory: Path, base_model: str) -> None:
    """Point adapter_config.json at the portable base name (never an absolute path into a virtualenv)."""
    path = Path(directory) / "adapter_config.json"
    config = read_json(path)
    config["base_model_name_or_path"] = portable_model_name(base_model)
    atomic_write_json(path, config)


@dataclass
class LoadedAdapter:
    """A base model with an adapter applied, ready for inference, plus what is needed to feed it."""

    model: nn.Module
    tokenizer: Any
    meta: AdapterMeta
    method: Method

    @property
    def label_names(self) -> list[str]:
        return self.meta.label_names


def load(adapter_dir: str | Path, base: str | None = None, allow_base_mismatch: bool = False) -> LoadedAdapter:
    """Load an adapter folder onto its base model (or onto `base`, a model folder or Hub id).

    Refuses a base whose weights differ from the one the adapter was trained on (unless `allow_base_mismatch`),
    and turns damaged files into a PeftkitError naming the file.
    """
    directory = Path(adapter_dir)
    meta = AdapterMeta.read(directory)
    base_name = base or meta.base_model
    verify_base(meta, base_name, allow_base_mismatch)
    check_files(directory, meta)
    model_cfg = ModelConfig(name_or_path=base_name, pooling=meta.pooling)
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, len(meta.label_names), tokenizer.pad_token_id)
    model, method = attach(model, directory, meta, resolve_model_path(base_name))
    return LoadedAdapter(model, tokenizer, meta, method)


def attach(model: nn.Module, directory: Path, meta: AdapterMeta, model_path: str) -> tuple[nn.Module, Method]:
    """Apply the adapter in `directory` to an already loaded base model (serve shares one base this way),
    with the pooling the adapter was trained with."""
    method_class = get_method_class(meta.method)
    options = build_dataclass(method_class.options_class, meta.method_options, f"{ADAPTER_META_FILE} method_options")
    method = build_method(meta.method, options)
    apply_pooling(model, meta.pooling)
    ctx = MethodContext(model_path, meta.head_modules or head_modules(model))
    try:
        model = method.load(model, Path(directory), ctx)
    except PeftkitError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # peft/safetensors/torch load errors
        raise PeftkitError(f"cannot load adapter {directory} ({short_error(e)}); "
                           "is the folder damaged or trained on another base?") from None
    model.eval()
    return model, method


def verify_base(meta: AdapterMeta, base_name: str, allow_mismatch: bool = False) -> str | None:
    """Compare the fingerprint recorded at training time with the base about to be used; return the latter.
    Skipped (no error) when either side is unknown, e.g. a Hub id that is not a local folder."""
    expected = meta.base_fingerprint
    actual = model_fingerprint(base_name)
    if expected and actual and expected != actual and not allow_mismatch:
        raise PeftkitError(
            f"adapter was trained on base {meta.base_model} (fingerprint {short(expected)}), "
            f"this base is {portable_model_name(base_name)} ({short(actual)}); "
            "pass --allow-base-mismatch to load anyway"
        )
    return actual


def check_files(directory: Path, meta: AdapterMeta) -> None:
    """Fail early and clearly on a damaged folder: JSON that does not parse, safetensors that are truncated."""
    directory = Path(directory)
    if meta.peft_format:
        config = read_json(directory / "adapter_config.json")
        if not isinstance(config, dict) or "peft_type" not in config:
            raise PeftkitError(f"{directory / 'adapter_config.json'} is not a peft adapter config (no peft_type)")
        check_safetensors(directory / "adapter_model.safetensors")
    else:
        from peftkit.adapters.base import WEIGHTS_FILE

        check_safetensors(directory / WEIGHTS_FILE)
