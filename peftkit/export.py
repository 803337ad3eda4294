"""Ship a trained adapter: a self-contained adapter folder, a merged full model, or a weighted combination of LoRAs.

`export_adapter` copies the run's adapter folder (PEFT layout for peft methods, peftkit safetensors otherwise),
completes peftkit.json (labels, input fields, base fingerprint, metrics) and writes a model card.
`export_merged` folds a mergeable adapter into the base and saves a plain transformers model.
`combine_adapters` combines LoRA adapters of one base with peft's `add_weighted_adapter`.
Every output folder appears atomically (io.atomic_directory): all of it, or nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.adapters import get_method_class
from peftkit.adapters.base import WEIGHTS_FILE
from peftkit.artifacts import check_files, load, set_peft_base_name, verify_base, weights_hashes
from peftkit.errors import PeftkitError, short_error
from peftkit.fingerprint import model_fingerprint, short
from peftkit.formats import ADAPTER_META_FILE, SUMMARY_FILE, AdapterMeta
from peftkit.io import atomic_directory, atomic_write_json, atomic_write_text, default_file_mode, read_json
from peftkit.modeling import head_pad_token_id, head_wrappers, portable_model_name, resolve_model_path
from peftkit.pooling import is_stock

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
COMBINE_HOWS = ("linear", "ties", "cat")


def adapter_folder(path: str | Path) -> Path:
    """A run folder (RUN_DIR/adapter) or an adapter folder itself."""
    path = Path(path)
    if (path / "adapter" / ADAPTER_META_FILE).exists():
        return path / "adapter"
    AdapterMeta.read(path)  # raises the standard "not an adapter folder" error
    return path


# --------------------------------------------------------------------------------------------- export


def export_adapter(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a self-contained adapter folder at `out`; returns it. The source is verified first (recorded sha256,
    readable safetensors, complete LoRA pairs, a safetensors base): a folder every loader would refuse is not
    shipped."""
    source = adapter_folder(run_dir)
    meta = AdapterMeta.read(source)
    check_files(source, meta)
    summary = _read_summary(source.parent)
    actual = model_fingerprint(meta.base_model)  # also refuses a local base folder with pickle-only weights
    # the base is here: load the adapter once, so missing tensors are caught too
    loaded = load(source, allow_base_mismatch=True) if actual is not None else None
    meta.base_fingerprint = meta.base_fingerprint or actual
    meta.base_model = portable_model_name(meta.base_model)
    for key in ("trainable_params", "total_params", "trainable_pct"):
        if getattr(meta, key) is None and key in summary:
            setattr(meta, key, summary[key])
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        names = PEFT_FILES if meta.peft_format else (WEIGHTS_FILE,)
        for name in names:
            shutil.copyfile(source / name, tmp / name)  # contents only: every shipped file gets the same mode
            default_file_mode(tmp / name)
        if meta.peft_format:
            set_peft_base_name(tmp, meta.base_model)
        meta.adapter_bytes = sum((tmp / n).stat().st_size for n in names)
        meta.weights_sha256 = weights_hashes(tmp, meta.peft_format)
        meta.write(tmp)
        blocker = stock_peft_blocker(meta, loaded.model if loaded else None)
        pad_id = head_pad_token_id(loaded.model) if loaded else None
        atomic_write_text(tmp / "README.md", model_card(meta, blocker, pad_id))
    return Path(out)


def export_merged(
    run_dir: str | Path, out: str | Path, allow_base_mismatch: bool = False, overwrite: bool = False
) -> Path:
    """Fold the adapter into its base and save a plain transformers model (safetensors) with tokenizer and labels."""
    source = adapter_folder(run_dir)
    meta = AdapterMeta.read(source)
    method_class = get_method_class(meta.method)
    if method_class.merge_blocker is not None:
        raise PeftkitError(
            f"method {meta.method!r} cannot be merged: {method_class.merge_blocker}; "
            "export the adapter folder instead (without --merge)"
        )
    loaded = load(source, allow_base_mismatch=allow_base_mismatch)
    merged = loaded.method.merge(loaded.model)
    if not is_stock(merged):
        raise PeftkitError(
            f"cannot merge: this run pools with {meta.pooling!r} (model.pooling), which {type(merged).__name__} "
            "does not compute, so stock transformers would load the merged folder and pool differently; export the "
            "adapter folder instead (without --merge: peftkit.load, predict and serve apply its pooling), or train "
            "with model.pooling: pooler"
        )
    names = loaded.label_names
    base = portable_model_name(meta.base_model)
    merged.config.id2label = dict(enumerate(names))
    merged.config.label2id = {n: i for i, n in enumerate(names)}
    merged.config.name_or_path = base
    # a plain `tokenizer(text, truncation=True)` must cut where training, eval, predict and serve cut
    loaded.tokenizer.model_max_length = meta.task.max_length
    half = saved_half_dtype(resolve_model_path(meta.base_model))
    if half is not None:  # loaded (and merged) in float32 for training; shipped as the base was: same size
        merged = merged.to(half)
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(tmp))
        info = {
            "merged_from": meta.method,
            "base_model": base,
            "base_fingerprint": meta.base_fingerprint,
            "task": dataclasses.asdict(meta.task),
            "metrics": meta.metrics,
            "pooling": meta.pooling,
        }  # config.json: peftkit_pooling, applied on load
        atomic_write_json(tmp / "peftkit_merged.json", info)
        atomic_write_text(tmp / "README.md", _merged_card(meta))
    return Path(out)


def stock_peft_blocker(meta: AdapterMeta, model: nn.Module | None) -> str | None:
    """Why stock `PeftModel.from_pretrained` on the stock base class would not reproduce this adapter, or None: the
    method's own reason (prefix tuning), or a pooling peftkit computes itself (peft would load it and pool the stock
    way). Without the model (its base is not here) only `pooler` counts as stock: a card must not promise a load."""
    reasons = [get_method_class(meta.method).stock_peft_blocker]
    if not (is_stock(model) if model is not None else meta.pooling == "pooler"):
        reasons.append(
            f"it pools with {meta.pooling!r} (peftkit's model.pooling) by the attention mask, which the stock "
            "classification class does not do here (under prompt or p-tuning a decoder head reads the last "
            "position, a pad in a padded batch): pool the body's hidden states that way and apply the classifier "
            "yourself (peftkit's README, Pooling)"
        )
    return "; ".join(r for r in reasons if r) or None


def model_card(meta: AdapterMeta, stock_blocker: str | None, pad_token_id: int | None = None) -> str:
    """The README.md of an exported adapter: what it is, how good, how big, how to load it. `stock_blocker`
    (`stock_peft_blocker`): why stock peft would not reproduce it; then the card shows no stock-peft snippet.
    `pad_token_id` (`head_pad_token_id`): the id the stock snippet passes, as the head finds the last token by it."""
    task = meta.task
    rows = []
    for split, values in (meta.metrics or {}).items():
        if values:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, (int, float)))
            rows.append(f"| {split} | {scores} |")
    text_field, pair_field = task.input_fields
    fields = f"`{text_field}`" + (f" + `{pair_field}`" if pair_field else "")
    labels = ", ".join(map(str, task.label_names))
    size = meta.adapter_bytes
    weights = (
        "PEFT (adapter_config.json + adapter_model.safetensors, head included)"
        if meta.peft_format
        else "peftkit (peftkit_weights.safetensors)"
    )
    lines = [
        f"# {task.name} — {meta.method} adapter",
        "",
        f"- **Method:** {meta.method} (options: `{json.dumps(meta.method_options)}`)",
        f"- **Base model:** `{meta.base_model}` (weights fingerprint `{short(meta.base_fingerprint)}`)",
        f"- **Task:** {task.name} — labels {labels}; input fields {fields}",
        f"- **Trainable parameters:** {_or_na(meta.trainable_params)} ({_or_na(meta.trainable_pct)}% of "
        f"{_or_na(meta.total_params)})",
        f"- **Adapter size:** {size / 1024:.1f} KiB" if size else "- **Adapter size:** n/a",
        f"- **Weights format:** {weights}",
        *(
            [
                f"- **Trained on:** a {meta.base_quantization} bitsandbytes-quantized base: the metrics below are "
                "that model's; the loads below put the adapter on the full-precision base, where scores can differ"
            ]
            if meta.base_quantization
            else []
        ),
        "",
        "## Metrics",
        "",
        "| split | metrics |",
        "|---|---|",
        *(rows or ["| - | none recorded |"]),
        "",
        "## Load with peftkit",
        "",
        "```python",
        "import peftkit",
        "loaded = peftkit.load('THIS_FOLDER')  # verifies the base fingerprint",
        "```",
        "",
        "```",
        "peftkit predict THIS_FOLDER --input rows.jsonl --output preds.jsonl",
        "peftkit serve --base " + meta.base_model + " --adapter name=THIS_FOLDER",
        "```",
    ]
    pad = "" if pad_token_id is None else f", pad_token_id={pad_token_id}"  # the id the batches are padded with
    if meta.peft_format and stock_blocker:
        lines += ["", "## Load with stock peft", "", f"Not as is: {stock_blocker}."]
    elif meta.peft_format:
        lines += [
            "",
            "## Load with stock peft",
            "",
            "```python",
            "from transformers import AutoModelForSequenceClassification",
            "from peft import PeftModel",
            f"base = AutoModelForSequenceClassification.from_pretrained({meta.base_model!r}, "
            f"num_labels={len(task.label_names)}{pad})",
            "model = PeftModel.from_pretrained(base, 'THIS_FOLDER').eval()",
            "```",
        ]
        note = get_method_class(meta.method).stock_peft_note
        lines += ["", f"Note: {note}."] if note else []
    return "\n".join(lines) + "\n"


def _or_na(value: Any) -> Any:
    return "n/a" if value is None else value


def saved_half_dtype(model_path: str) -> torch.dtype | None:
    """float16 / bfloat16 where a local base folder's config.json says it was saved so, else None (float32, or a
    Hub id not on disk). peftkit loads every base in float32, so a merged export would be twice the base's size."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    saved = read_json(config)
    name = saved.get("dtype") or saved.get("torch_dtype")  # transformers 5 / 4 spell it differently
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name) if isinstance(name, str) else None


def _merged_card(meta: AdapterMeta) -> str:
    task = meta.task
    return (
        f"# {task.name} — {meta.method} merged into {meta.base_model}\n\n"
        f"A plain transformers model; labels {', '.join(map(str, task.label_names))}.\n\n"
        "```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "model = AutoModelForSequenceClassification.from_pretrained('THIS_FOLDER')\n"
        "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER')\n```\n"
    )


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY_FILE
    return read_json(path) if path.is_file() else {}


# --------------------------------------------------------------------------------------------- combine


def combine_adapters(
    adapter_dirs: list[str | Path],
    weights: list[float],
    how: str = "linear",
    density: float = 0.5,
    out: str | Path = "combined",
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Combine LoRA adapters trained on one base into one LoRA adapter (peft `add_weighted_adapter`).

    peft cannot average the task head (modules_to_save), so every adapter must have the same label names and
    the combined adapter takes the FIRST adapter's head. Returns (out, a note saying so).
    """
    folders, metas = _check_combinable(adapter_dirs, weights, how, density)

    import torch
    from peft import PeftModel

    from peftkit.adapters._peft import save_peft
    from peftkit.config import ModelConfig
    from peftkit.modeling import load_model, load_tokenizer

    first = metas[0]
    verify_base(first, first.base_model)
    cfg = ModelConfig(name_or_path=first.base_model, pooling=first.pooling)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, len(first.label_names), tokenizer.pad_token_id)
    names = [f"src{i}" for i in range(len(folders))]
    try:
        model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0])
        for name, folder in zip(names[1:], folders[1:]):
            model.load_adapter(str(folder), adapter_name=name)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise PeftkitError(f"cannot load the adapters to combine ({short_error(e)})") from None
    model.eval()
    heads = head_wrappers(model)
    head_state = {id(w): {k: v.clone() for k, v in w.modules_to_save[names[0]].state_dict().items()} for w in heads}
    for w in heads:  # peft refuses to combine adapters that each carry a head; keep only the first one's
        for name in names[1:]:
            if name in w.modules_to_save:
                del w.modules_to_save[name]
    kwargs = {"density": density} if how == "ties" else {}
    try:
        model.add_weighted_adapter(names, list(weights), adapter_name="default", combination_type=how, **kwargs)
    except ValueError as e:
        raise PeftkitError(f"peft refused the combination: {e}") from None
    for w in heads:
        if "default" not in w.modules_to_save:
            w.modules_to_save["default"] = copy.deepcopy(w.modules_to_save[names[0]])
        w.modules_to_save["default"].load_state_dict(head_state[id(w)])
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    new_config = model.peft_config["default"]
    meta = dataclasses.replace(
        first,
        method_options={**first.method_options, "r": new_config.r, "alpha": new_config.lora_alpha},
        base_model=portable_model_name(first.base_model),
        metrics=None,
        combined_from=[{"adapter": str(f), "weight": w} for f, w in zip(folders, weights)],
        combination={"how": how, "density": density if how == "ties" else None, "head_from": str(folders[0])},
    )
    with atomic_directory(Path(out), overwrite=overwrite) as tmp, torch.no_grad():
        save_peft(model, tmp)
        set_peft_base_name(tmp, first.base_model)
        for name in PEFT_FILES:
            default_file_mode(tmp / name)
        meta.adapter_bytes = sum((tmp / n).stat().st_size for n in PEFT_FILES)
        meta.weights_sha256 = weights_hashes(tmp, True)
        meta.write(tmp)
        card = model_card(meta, stock_peft_blocker(meta, model), head_pad_token_id(model))
        atomic_write_text(tmp / "README.md", card)
    return Path(out), f"task head: taken from {folders[0]} (peft cannot average classification heads)"


def _check_combinable(
    adapter_dirs: list[str | Path], weights: list[float], how: str, density: float
) -> tuple[list[Path], list[AdapterMeta]]:
    """Refuse, before loading any model, what peft's weighted combination cannot do; return folders and metas."""
    if how not in COMBINE_HOWS:
        raise PeftkitError(f"unknown combine --how {how!r}; valid: {', '.join(COMBINE_HOWS)}")
    if not adapter_dirs:
        raise PeftkitError("combine needs at least one adapter folder")
    if len(weights) != len(adapter_dirs):
        raise PeftkitError(
            f"--weights has {len(weights)} values for {len(adapter_dirs)} adapters; give one per adapter"
        )
    if how == "ties" and not 0.0 < density <= 1.0:
        raise PeftkitError(f"--density must be in (0, 1], got {density}")
    folders = [adapter_folder(d) for d in adapter_dirs]
    metas = [AdapterMeta.read(f) for f in folders]
    first = metas[0]
    for folder, meta in zip(folders, metas):
        if meta.method != "lora":
            raise PeftkitError(
                f"{folder} is a {meta.method!r} adapter; combine takes plain LoRA adapters only "
                "(peft's weighted combination does not support DoRA, AdaLoRA or other methods)"
            )
        check_files(folder, meta)
        if meta.label_names != first.label_names:
            raise PeftkitError(
                f"{folder} has labels {meta.label_names}, {folders[0]} has {first.label_names}; "
                "combined adapters must share one label set"
            )
        if len({meta.base_fingerprint, first.base_fingerprint} - {None}) > 1:
            raise PeftkitError(
                f"{folder} was trained on another base ({short(meta.base_fingerprint)}) than "
                f"{folders[0]} ({short(first.base_fingerprint)}); combine needs one base"
            )
    ranks = [read_json(f / "adapter_config.json").get("r") for f in folders]
    if how in ("linear", "ties") and len(folders) > 1 and len(set(ranks)) > 1:
        raise PeftkitError(f"--how {how} needs equal LoRA ranks, these have r={ranks}; use --how cat (rank = sum)")
    return folders, metas
