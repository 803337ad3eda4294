"""Shipped adapters are verified, never trusted: sha256 of the weights, the tensors the adapter needs, a
safetensors base, a well-formed peftkit.json, finite outputs. Every tool (peftkit.load, predict, export, serve)
refuses a damaged or foreign folder with one line, never a traceback."""

from __future__ import annotations

import json
import os
import stat

import pytest
from damage import (
    WEIGHTS,
    copy_adapter,
    drop,
    edit_meta,
    flip_tensor_bytes,
    nan_lora,
    pickle_only_base,
    rehash,
    rewrite_tensors,
)
from tiny_runs import TEXTS, TinyRuns

from peftkit.artifacts import load
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.export import export_adapter
from peftkit.formats import ADAPTER_FORMAT
from peftkit.io import sha256_file

TOKEN = "t0ken"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, toy_task_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield TinyRuns(tmp_path_factory.mktemp("integrity"), tiny_model_dir("bert"), toy_task_dir)
    mp.undo()


@pytest.fixture(scope="module")
def lora(runs):
    return runs.run("lora") / "adapter"


@pytest.fixture(scope="module")
def client(runs, lora):
    from fastapi.testclient import TestClient

    from peftkit.serve import create_app

    with TestClient(create_app(str(runs.model_dir), {"good": str(lora)}, admin_token=TOKEN)) as c:
        yield c


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return src


def one_line_exit_2(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("peftkit: error:")]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err  # a progress bar may precede
    return errors[0]


def test_save_records_weights_sha256(lora):
    meta = json.loads((lora / "peftkit.json").read_text())
    assert meta["format_version"] == ADAPTER_FORMAT == "1.2"
    assert meta["weights_sha256"] == {WEIGHTS: sha256_file(lora / WEIGHTS)}


def test_old_meta_without_hash_still_loads(lora, tmp_path):
    folder = copy_adapter(lora, tmp_path / "old")
    edit_meta(folder, weights_sha256=None, format_version="1.1")
    assert load(folder).meta.weights_sha256 is None


DAMAGES = {  # name -> (how, expected words in the one-line error)
    "flipped_bytes": (lambda f: flip_tensor_bytes(f / WEIGHTS), "sha256"),
    "no_lora_B": (lambda f: rewrite_tensors(f, drop("lora_B")), "lacks"),
    "no_head": (lambda f: rewrite_tensors(f, drop("classifier")), "cannot load adapter"),
    "meta_is_list": (lambda f: (f / "peftkit.json").write_text("[1, 2]"), "JSON object"),
    "meta_lacks_task": (lambda f: edit_meta(f, task=None), "lacks task"),
    "meta_bad_fingerprint": (lambda f: edit_meta(f, base_fingerprint=5), "base_fingerprint must be"),
    "meta_bad_hashes": (lambda f: edit_meta(f, weights_sha256={WEIGHTS: "zz"}), "weights_sha256"),
    "meta_not_json": (lambda f: (f / "peftkit.json").write_text('{"method": '), "not valid JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_adapter_refused_by_every_tool(damage, lora, client, inputs, tmp_path, capsys):
    how, words = DAMAGES[damage]
    folder = copy_adapter(lora, tmp_path / "bad")
    how(folder)
    with pytest.raises(PeftkitError, match=words):
        load(folder)
    out = tmp_path / "preds.jsonl"
    assert words in one_line_exit_2(capsys, ["predict", str(folder), "--input", str(inputs), "--output", str(out)])
    assert not out.exists()
    assert words in one_line_exit_2(capsys, ["export", str(folder), "--out", str(tmp_path / "exported")])
    assert not (tmp_path / "exported").exists()  # validated before anything was copied
    reply = client.post(
        "/v1/adapters", json={"name": "bad", "path": str(folder)}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert reply.status_code == 400 and words in reply.json()["detail"], reply.text
    assert set(client.app.state.pool.deployments) == {"good"}


def test_flipped_bytes_in_peftkit_format_weights_refused(runs, tmp_path):
    folder = copy_adapter(runs.run("bottleneck") / "adapter", tmp_path / "b")
    flip_tensor_bytes(folder / "peftkit_weights.safetensors")
    with pytest.raises(PeftkitError, match="sha256"):
        load(folder)


def test_missing_lora_B_caught_without_a_recorded_hash(lora, tmp_path):
    """An old-format folder (no sha256) still cannot ship an adapter that silently does nothing."""
    folder = copy_adapter(lora, tmp_path / "nob")
    rewrite_tensors(folder, drop("lora_B"))
    edit_meta(folder, weights_sha256=None)
    with pytest.raises(PeftkitError, match=r"lacks tensors: .*lora_B"):
        load(folder)


def test_pickle_only_base_refused_everywhere(runs, lora, inputs, tmp_path, capsys):
    base = pickle_only_base(runs.model_dir, tmp_path / "pickle-base")
    folder = copy_adapter(lora, tmp_path / "p")
    edit_meta(folder, base_model=str(base))
    for call in (lambda: load(folder), lambda: load(lora, base=str(base))):
        with pytest.raises(PeftkitError, match="no safetensors weights, only pytorch_model.bin"):
            call()
    words = "never loads pickle files"
    assert words in one_line_exit_2(capsys, ["predict", str(folder), "--input", str(inputs)])
    assert words in one_line_exit_2(capsys, ["export", str(folder), "--out", str(tmp_path / "e")])
    assert words in one_line_exit_2(capsys, ["serve", "--base", str(base), "--adapter", f"x={lora}"])


def test_nan_adapter_predict_names_it_broken_and_writes_nothing(lora, inputs, tmp_path, capsys):
    folder = copy_adapter(lora, tmp_path / "nan")
    rewrite_tensors(folder, nan_lora)
    out = tmp_path / "preds.jsonl"
    err = one_line_exit_2(capsys, ["predict", str(folder), "--input", str(inputs), "--output", str(out)])
    assert "non-finite" in err and "broken" in err and str(folder) in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".preds")]


def test_export_refuses_damage_before_copying_and_keeps_modes_alike(runs, tmp_path):
    run = runs.run("lora")
    os.chmod(run / "adapter" / WEIGHTS, 0o600)  # as peft/safetensors may leave it
    out = export_adapter(run, tmp_path / "e")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    mask = os.umask(0)
    os.umask(mask)
    assert set(modes.values()) == {0o666 & ~mask}, modes
    meta = json.loads((out / "peftkit.json").read_text())
    assert meta["weights_sha256"] == {WEIGHTS: sha256_file(out / WEIGHTS)}
    load(out)  # the export verifies
    rehash(out)  # and a re-recorded hash still verifies
    load(out)


def test_serve_and_combine_clis_refuse_damaged_folders_in_one_line(runs, lora, tmp_path, capsys):
    listed = copy_adapter(lora, tmp_path / "listed")
    (listed / "peftkit.json").write_text("[]")
    err = one_line_exit_2(capsys, ["serve", "--base", str(runs.model_dir), "--adapter", f"x={listed}"])
    assert "must hold a JSON object" in err
    flipped = copy_adapter(lora, tmp_path / "flipped")
    flip_tensor_bytes(flipped / WEIGHTS)
    err = one_line_exit_2(
        capsys, ["combine", str(lora), str(flipped), "--weights", "0.5,0.5", "--out", str(tmp_path / "c")]
    )
    assert "sha256" in err and not (tmp_path / "c").exists()


def test_serve_refuses_a_port_out_of_range_before_loading(lora, capsys):
    err = one_line_exit_2(capsys, ["serve", "--port", "99999", "--adapter", f"x={lora}"])
    assert "--port must be 0..65535, got 99999" in err
