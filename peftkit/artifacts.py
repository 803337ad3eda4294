"""The adapter folder: what a run ships and what `peftkit.load` reads back.

Every folder has `peftkit.json` (method, options, base model, task labels and input fields). Weights are in
PEFT's own layout (`adapter_config.json` + `adapter_model.safetensors`, head included) for methods peft has, so
stock `peft.PeftModel.from_pretrained(base, folder)` loads them (an exported card says where that needs more:
`export.stock_peft_blocker`); otherwise in `peftkit_weights.safetensors`.
Only safetensors and JSON are read: no pickle, no code from the folder. Since format 1.2, `peftkit.json` records
the sha256 of the weights file; every loader verifies it, and checks that the tensors the adapter needs are there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.adapters import Method, MethodContext, build_method, get_method_class
from peftkit.adapters._peft import peft_state_dict
from peftkit.config import ModelConfig
from peftkit.config_values import build_dataclass
from peftkit.errors import PeftkitError, short_error
from peftkit.fingerprint import model_fingerprint, short
from peftkit.formats import ADAPTER_META_FILE, AdapterMeta, TaskInfo
from peftkit.io import (
    atomic_directory,
    atomic_write_json,
    check_safetensors,
    default_file_mode,
    read_json,
    safetensors_keys,
    sha256_file,
)
from peftkit.modeling import (
    ParameterCount,
    head_modules,
    load_model,
    load_tokenizer,
    portable_model_name,
    resolve_model_path,
)
from peftkit.pooling import apply_pooling, pooling_of


def save_adapter(
    model: nn.Module,
    method: Method,
    directory: Path,
    *,
    base_model: str,
    task: TaskInfo,
    metrics: dict[str, Any] | None = None,
    params: ParameterCount | None = None,
    head_modules: list[str] | None = None,
    base_quantization: str | None = None,
) -> AdapterMeta:
    """Write the adapter folder atomically: either the whole folder appears, or nothing changes."""
    directory = Path(directory)
    with atomic_directory(directory, overwrite=True) as tmp:
        method.save(model, tmp)
        if method.uses_peft:
            set_peft_base_name(tmp, base_model)
        for path in tmp.iterdir():
            default_file_mode(path)  # peft/safetensors may write 0600; a shipped folder is readable alike
        meta = AdapterMeta(
            method=method.name,
            method_options=dataclasses.asdict(method.options),
            peft_format=method.uses_peft,
            base_model=portable_model_name(base_model),
            base_fingerprint=model_fingerprint(base_model),
            task=task,
            metrics=metrics,
            adapter_bytes=sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
            pooling=pooling_of(model),
            head_modules=head_modules,
            base_quantization=base_quantization,
            weights_sha256=weights_hashes(tmp, method.uses_peft),
            **(
                {
                    "trainable_params": params.trainable,
                    "total_params": params.total,
                    "trainable_pct": round(params.trainable_pct, 4),
                }
                if params
                else {}
            ),
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
    directory: Path | None = None

    @property
    def label_names(self) -> list[str]:
        return self.meta.label_names

    def predict(
        self, texts: list[str], text_pairs: list[str] | None = None, batch_size: int = 64, bf16: bool | None = None
    ) -> list[dict[str, Any]]:
        """`peftkit predict` from Python: one dict per text, in order, as the CLI writes its prediction fields
        (label, label_name, probabilities by label name). `bf16` None = autocast where it pays, as the CLI.
        Predicts with the adapter as loaded; `merged()` first folds it in, as the CLI does by default."""
        from peftkit.predict import predict_texts

        return predict_texts(self, texts, text_pairs, batch_size, bf16)

    def merged(self) -> LoadedAdapter:
        """The adapter folded into its base where the method allows (LoRA, IA3, ...: no adapter matmuls left, the
        same logits to ~1e-6), else itself. Takes over `self.model`: merging rewrites the base weights in place."""
        if self.method.merge_blocker:
            return self
        try:
            model = self.method.merge(self.model)
        except PeftkitError:  # the generic peft method: this tuner type cannot merge
            return self
        return dataclasses.replace(self, model=model.eval())


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
    return LoadedAdapter(model, tokenizer, meta, method, directory)


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
        raise PeftkitError(
            f"cannot load adapter {directory} ({load_error_text(e)}); "
            "is the folder damaged or trained on another base?"
        ) from None
    if meta.peft_format:
        check_peft_keys(model, Path(directory))
    model.eval()
    return model, method


def load_error_text(e: BaseException) -> str:
    """One line for a library's load error: torch's state_dict errors put the useful part ("size mismatch for
    ...") on a later line than the first."""
    for line in str(e).splitlines():
        line = line.strip()
        if line.startswith(("size mismatch", "Missing key", "Unexpected key")):
            return f"{type(e).__name__}: {line[:300]}"
    return short_error(e)


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


def weights_file(meta: AdapterMeta | bool) -> str:
    """The weights file name of an adapter folder: PEFT's, or peftkit's own."""
    from peftkit.adapters.base import WEIGHTS_FILE

    peft_format = meta.peft_format if isinstance(meta, AdapterMeta) else meta
    return PEFT_WEIGHTS if peft_format else WEIGHTS_FILE


PEFT_WEIGHTS = "adapter_model.safetensors"


def weights_hashes(directory: Path, peft_format: bool) -> dict[str, str]:
    """{weights file name: sha256 hex}: what `peftkit.json` records and every loader verifies."""
    name = weights_file(peft_format)
    return {name: sha256_file(Path(directory) / name)}


def check_files(directory: Path, meta: AdapterMeta) -> None:
    """Fail early and clearly on a damaged folder, before any model is built: JSON that does not parse,
    safetensors that are truncated, weights whose sha256 differs from the one recorded at save time, and
    LoRA tensors without their partner (a lora_A without its lora_B, or the other way round)."""
    directory = Path(directory)
    if meta.peft_format:
        config = read_json(directory / "adapter_config.json")
        if not isinstance(config, dict) or "peft_type" not in config:
            raise PeftkitError(f"{directory / 'adapter_config.json'} is not a peft adapter config (no peft_type)")
    path = check_safetensors(directory / weights_file(meta))
    for name, expected in (meta.weights_sha256 or {}).items():
        target = directory / name
        if not target.is_file():
            raise PeftkitError(f"missing weights file {target} (listed in {ADAPTER_META_FILE})")
        if sha256_file(target) != expected:
            raise PeftkitError(
                f"{target} does not match the sha256 recorded in {ADAPTER_META_FILE} "
                "(changed or damaged after it was saved); refusing to load it"
            )
    if meta.peft_format:
        keys = safetensors_keys(path)
        for have, want in ((".lora_A.", ".lora_B."), (".lora_B.", ".lora_A.")):
            orphans = sorted(k for k in keys if have in k and k.replace(have, want) not in keys)
            if orphans:
                raise PeftkitError(
                    f"{path} lacks tensors: {orphans[0].replace(have, want)} (and "
                    f"{len(orphans) - 1} more) are missing; the adapter is incomplete"
                )


def check_peft_keys(model: nn.Module, directory: Path, adapter_name: str = "default") -> None:
    """Refuse a PEFT weights file that lacks tensors the loaded adapter has parameters for: peft would leave
    them at their initial values (lora_B at zero: the adapter silently does nothing)."""
    path = Path(directory) / PEFT_WEIGHTS
    expected = set(peft_state_dict(model, adapter_name))
    missing = sorted(expected - safetensors_keys(path))
    if missing:
        raise PeftkitError(
            f"{path} lacks {len(missing)} of the {len(expected)} tensors this adapter needs "
            f"(e.g. {missing[0]}); the adapter is incomplete or damaged"
        )
