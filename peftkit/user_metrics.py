"""Metrics users bring: Hugging Face `evaluate` modules scored next to peftkit's own scikit-learn metrics.

`--metric SPEC` (on `peftkit eval` and `peftkit bench`) names an `evaluate` module: a local folder holding
`<name>.py` with an `evaluate.Metric` subclass (or that `.py` file itself), or a Hub id such as `accuracy` or
`user/metric` when online. Loading a local module *runs its Python file*: that is the user's explicit choice.

Scores are named `<module>:<key>` for every numeric scalar `compute` returns (e.g. `balanced_error:balanced_error`,
`glue:f1`). The `:` keeps them apart from peftkit's own names (`accuracy`, `f1`, `macro_f1`, `loss`), so the Hub's
`accuracy` module scores as `accuracy:accuracy` beside scikit-learn's `accuracy`. Values that are not numeric
scalars (lists, strings) are left out; a module returning none, or a NaN/inf score, is an error.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError, short_error

SEPARATOR = ":"
INSTALL_HINT = "pip install 'peftkit[metrics]'"
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")
METRIC_HELP = (
    "an evaluate module to score with besides the built-in metrics: a local folder holding <name>.py "
    "(loading it runs that Python file) or a Hub id when online; repeatable; scores are named <module>:<key>"
)


@dataclass(frozen=True)
class UserMetric:
    """A loaded `evaluate` module and the spec it came from (a local path is made absolute)."""

    spec: str
    name: str  # the module's name: the prefix of every score it gives
    module: Any  # an evaluate.EvaluationModule


def offline_flag() -> str | None:
    """The environment variable that keeps `evaluate` off the network, if one is set."""
    return next((f for f in OFFLINE_FLAGS if os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE")), None)


def local_script(spec: str) -> Path | None:
    """The metric script a local spec names (`DIR/<DIR>.py` or a `.py` file), None for a Hub id.

    A spec that looks like a path (`./x`, `/x`, `~/x`, `a/b/c`, `x.py`) but names no script is an error here, so
    it never falls through to a confusing Hub lookup.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".py":
        return path.resolve()
    script = path / f"{path.resolve().name}.py"
    if path.is_dir() and script.is_file():
        return script.resolve()
    if not (spec.startswith((".", "/", "~")) or spec.endswith(".py") or spec.count("/") > 1):
        return None  # a Hub id (as in evaluate.load, a same-named folder without the script does not count)
    what = f"folder {path} has no {script.name}" if path.is_dir() else f"{path} does not exist"
    raise PeftkitError(f"metric {spec!r}: not a local evaluate module folder ({what})")


def load_user_metric(spec: str) -> UserMetric:
    """Load an `evaluate` module from a local folder/script, or from the Hub when online."""
    try:
        import evaluate
    except ImportError:
        raise PeftkitError(f"metric {spec!r}: the `evaluate` package is not installed; {INSTALL_HINT}") from None
    script = local_script(spec)
    try:
        module = evaluate.load(str(script) if script else spec)
    except Exception as e:  # noqa: BLE001 - any failure of a user's module or of the Hub becomes one line
        if script:
            raise PeftkitError(f"metric {spec!r}: loading {script} failed: {short_error(e)}") from None
        flag = offline_flag()
        if flag:
            raise PeftkitError(
                f"metric {spec!r}: not a local evaluate module folder and cannot be fetched offline ({flag}=1)"
            ) from None
        raise PeftkitError(f"metric {spec!r}: not found locally or on the Hub: {short_error(e)}") from None
    name = getattr(module, "name", None) or (script.stem if script else spec.rsplit("/", 1)[-1])
    return UserMetric(str(script) if script else spec, name, module)


def load_user_metrics(specs: Iterable[str]) -> list[UserMetric]:
    """Load every spec; two modules with one name would write the same score names, so that is refused."""
    metrics = [load_user_metric(spec) for spec in specs]
    names = [m.name for m in metrics]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PeftkitError(f"two --metric modules are both named {twice[0]!r}; their scores would collide")
    return metrics


def score_user_metric(metric: UserMetric, predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
    """`compute` on predicted and true label ids; its numeric scalars as `<module>:<key>` floats."""
    try:
        result = metric.module.compute(predictions=list(predictions), references=list(references))
    except Exception as e:  # noqa: BLE001 - a user's module failing is the user's to fix: one line
        raise PeftkitError(f"metric {metric.name!r}: compute failed: {short_error(e)}") from None
    if not isinstance(result, dict):
        raise PeftkitError(f"metric {metric.name!r}: compute returned {type(result).__name__}, expected a dict")
    scores = {}
    for key, value in result.items():
        if getattr(value, "ndim", None) == 0:  # a 0-d numpy array
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if not math.isfinite(value):
            raise PeftkitError(f"metric {metric.name!r}: {key!r} is {value}; scores must be finite numbers")
        scores[f"{metric.name}{SEPARATOR}{key}"] = float(value)
    if not scores:
        keys = ", ".join(map(str, result)) or "none"
        raise PeftkitError(f"metric {metric.name!r}: compute returned no numeric score (keys: {keys})")
    return scores


def score_user_metrics(
    metrics: Iterable[UserMetric], predictions: Sequence[int], references: Sequence[int]
) -> dict[str, float]:
    """Every module's scores in one mapping (names cannot clash: load_user_metrics refuses shared names)."""
    return {k: v for m in metrics for k, v in score_user_metric(m, predictions, references).items()}


def unscored_modules(scored: dict[str, Any] | None, names: Iterable[str]) -> list[str]:
    """The modules among `names` that gave a bench cell's `user_metrics` (None: never scored) no validation score,
    so a rerun with another --metric can say which scores its done cells lack."""
    keys = (scored or {}).get("validation") or {}
    return [n for n in names if not any(k.startswith(f"{n}{SEPARATOR}") for k in keys)]


def score_saved_adapter(specs: Sequence[str], adapter_dir: Path, config: Any) -> dict[str, Any]:
    """A bench cell's user metrics: the kept model's validation predictions (and test, where labelled) scored by
    every module, as `{"validation": {...}, "test": {...}}`.

    A module failing here is recorded in `"error"` (beside the other modules' scores) instead of failing the cell:
    training and the built-in metrics stand, and the driver already loaded every module once before the grid
    started. A failure before any module scores (loading the adapter or the data) is the only `"error"`.
    """
    from peftkit.artifacts import load
    from peftkit.data import encode, load_task
    from peftkit.inference import predict_logits
    from peftkit.modeling import resolve_device

    try:
        loaded = load(adapter_dir, base=config.model.name_or_path)
        device = resolve_device(config.train.device)
        model = loaded.model.to(device)
        task = load_task(config.task, seed=config.train.seed)
        labelled = {}  # split -> (predictions, references): one forward pass serves every module
        for split in ("validation", "test"):
            rows = task.splits.get(split)
            encoded = encode(rows, loaded.tokenizer, config.task.max_length) if rows else None
            if encoded is not None and encoded.labels is not None:
                logits = predict_logits(model, encoded, config.train.eval_batch_size, device, config.train.bf16)
                labelled[split] = (logits.argmax(-1).tolist(), encoded.labels)
    except PeftkitError as e:
        return {"error": str(e)}
    out: dict[str, Any] = {}
    errors = []
    for spec in specs:
        try:
            metric = load_user_metric(spec)
            scores = {split: score_user_metric(metric, *pair) for split, pair in labelled.items()}
        except PeftkitError as e:
            errors.append(str(e))
            continue
        for split, split_scores in scores.items():
            out.setdefault(split, {}).update(split_scores)
    if errors:
        out["error"] = "; ".join(errors)
    return out
