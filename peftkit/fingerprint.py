"""A fingerprint of a pretrained base model, so an adapter is never silently applied to the wrong base.

The hash covers every weight tensor's name, dtype, shape and raw bytes, read straight from the model folder's
`*.safetensors` files (so it describes the *pretrained* base, not a loaded model with a fresh random head, and
does not depend on how the checkpoint is sharded). Hashing a 90 MB model takes a fraction of a second, but
serving and predict call it on every start, so results are cached by (path, file sizes, mtimes) in
`$PEFTKIT_CACHE/fingerprints.json` (default `~/.cache/peftkit`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.io import atomic_write_json

CACHE_ENV = "PEFTKIT_CACHE"
CACHE_FILE = "fingerprints.json"
ALGORITHM = "sha256-v1"  # bump when the hashed content changes, so old cache entries are ignored


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peftkit").expanduser()


def model_fingerprint(model_or_path: Any) -> str | None:
    """sha256 hex of the base weights of a model folder (or a loaded model's source folder); None for a Hub id
    that is not a local folder, or a folder without any weights (nothing to verify against). A folder whose
    weights are only pickle files (pytorch_model.bin) is refused (PeftkitError), never silently unverified."""
    from peftkit.modeling import is_missing_local_path, require_safetensors, resolve_model_path

    if isinstance(model_or_path, (str, os.PathLike)):
        name = str(model_or_path)
    else:  # a loaded transformers model (or a peft wrapper around one): use the folder it came from
        config = getattr(model_or_path, "config", None)
        name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", "")
    if not name or is_missing_local_path(name):  # nothing on disk to fingerprint
        return None
    folder = Path(resolve_model_path(name)).expanduser()
    if not folder.is_dir():
        return None
    require_safetensors(str(folder))  # a pickle-only base is refused here, not silently left unverified
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    folder = folder.resolve()
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = str(folder)
    cache = _read_cache()
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("files") == stamp and entry.get("algorithm") == ALGORITHM:
        return entry["fingerprint"]
    fingerprint = _hash_files(files)
    cache[key] = {"files": stamp, "algorithm": ALGORITHM, "fingerprint": fingerprint}
    try:
        atomic_write_json(cache_dir() / CACHE_FILE, cache)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return fingerprint


def short(fingerprint: str | None) -> str:
    return f"{fingerprint[:12]}…" if fingerprint else "unknown"


def _read_cache() -> dict[str, Any]:
    path = cache_dir() / CACHE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged cache: recompute
    return data if isinstance(data, dict) else {}


def _hash_files(files: list[Path]) -> str:
    """Hash tensors in global name order across all shard files, reading the safetensors header ourselves
    (raw bytes, any dtype, no torch conversion)."""
    entries: list[tuple[str, Path, dict[str, Any], int]] = []
    for path in files:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise PeftkitError(f"{path} is not a readable safetensors file (truncated)")
            (length,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(length))
            except ValueError:
                raise PeftkitError(f"{path} is not a readable safetensors file (corrupted header)") from None
        for name, info in header.items():
            if name != "__metadata__":
                entries.append((name, path, info, 8 + length))
    entries.sort(key=lambda e: e[0])
    digest = hashlib.sha256()
    maps: dict[Path, mmap.mmap] = {}
    try:
        for name, path, info, data_start in entries:
            if path not in maps:
                with path.open("rb") as f:
                    maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            begin, end = info["data_offsets"]
            if data_start + end > len(maps[path]):
                raise PeftkitError(f"{path} is truncated (tensor {name} runs past the end of the file)")
            digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            digest.update(maps[path][data_start + begin : data_start + end])
    finally:
        for m in maps.values():
            m.close()
    return digest.hexdigest()
