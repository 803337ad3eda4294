"""Ways to damage an adapter folder, shared by the integrity and server tests."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_meta(folder: Path, **changes) -> None:
    path = folder / "peftkit.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def rehash(folder: Path) -> None:
    """Record the current weights' sha256, as a forger (or an older peftkit plus a hand edit) would."""
    from peftkit.io import sha256_file

    name = WEIGHTS if (folder / WEIGHTS).exists() else "peftkit_weights.safetensors"
    edit_meta(folder, weights_sha256={name: sha256_file(folder / name)})


def flip_tensor_bytes(path: Path) -> None:
    """Flip a few bytes inside the tensor data (past the header): the file stays a readable safetensors file."""
    data = bytearray(path.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    start = 8 + header
    for offset in (start + 1, start + (len(data) - start) // 2, len(data) - 2):
        data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def rewrite_tensors(folder: Path, transform) -> None:
    """Replace the weights file by transform({name: tensor}) and record the new sha256."""
    from safetensors.torch import load_file, save_file

    path = folder / WEIGHTS
    tensors = transform(load_file(str(path)))
    save_file(tensors, str(path))
    rehash(folder)


def nan_lora(tensors):
    import torch

    return {k: (torch.full_like(v, float("nan")) if "lora_B" in k else v) for k, v in tensors.items()}


def drop(fragment: str):
    return lambda tensors: {k: v for k, v in tensors.items() if fragment not in k}


def pickle_only_base(src: Path, dst: Path) -> Path:
    """A copy of a base model folder whose weights are only a pytorch_model.bin (a pickle; never loaded)."""
    import torch
    from safetensors.torch import load_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
    return dst
