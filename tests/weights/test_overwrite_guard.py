"""`overwrite` replaces only folders lmcompress wrote; saved checkpoints get ordinary permissions (issue 9, item 4)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from lmcompress.errors import LMCompressError
from lmcompress.models import tiny_model
from lmcompress.weights import RTNConfig, quantize_
from lmcompress.weights.checkpoint import CHECKPOINT_MARKER, is_lmcompress_checkpoint, save_quantized
from lmcompress.weights.cli import PROVENANCE_FILE, main

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    quantize_(m, RTNConfig(group_size=32), progress=False)
    return m


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def foreign_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("my notes\n")
    (path / "config.json").write_text("{}")  # even a model-looking folder: no marker, not ours
    return path


def test_every_checkpoint_has_the_marker(model, tmp_path):
    folder = save_quantized(model, tmp_path / "ckpt")
    marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    assert marker["writer"] == "lmcompress" and marker["quantization_config"]["group_size"] == 32
    assert is_lmcompress_checkpoint(folder)


def test_files_get_ordinary_permissions(model, tmp_path, umask_022):
    folder = save_quantized(model, tmp_path / "ckpt")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}
    assert modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}, modes


def test_permissions_follow_the_umask(model, tmp_path):
    old = os.umask(0o077)
    try:
        folder = save_quantized(model, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()} == {0o600}


def test_overwrite_replaces_an_lmcompress_checkpoint(model, tmp_path):
    folder = save_quantized(model, tmp_path / "ckpt")
    (folder / "stale.txt").write_text("old run")
    save_quantized(model, folder, overwrite=True)
    assert not (folder / "stale.txt").exists() and (folder / "model.safetensors").is_file()


def test_overwrite_accepts_an_older_cli_checkpoint(model, tmp_path):
    folder = save_quantized(model, tmp_path / "ckpt")
    (folder / CHECKPOINT_MARKER).unlink()
    (folder / PROVENANCE_FILE).write_text("{}")  # what `awq quantize` wrote before the marker existed
    save_quantized(model, folder, overwrite=True)
    assert (folder / CHECKPOINT_MARKER).is_file()


def test_overwrite_refuses_a_foreign_folder(model, tmp_path):
    folder = foreign_folder(tmp_path / "mine")
    with pytest.raises(LMCompressError, match="not a checkpoint lmcompress wrote"):
        save_quantized(model, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "my notes\n"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary folder left


def test_cli_overwrite_of_a_foreign_folder_exits_2(tmp_path, capsys):
    folder = foreign_folder(tmp_path / "mine")
    code = main(["awq", "quantize", "tiny-llama", str(folder), "--method", "rtn", "--group-size", "32",
                 "--device", "cpu", "--overwrite", "--quiet"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a checkpoint lmcompress wrote" in err[0] and "Traceback" not in err[0]
    assert (folder / "notes.txt").read_text() == "my notes\n"


def test_cli_overwrite_of_its_own_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    argv = ["awq", "quantize", "tiny-llama", str(out), "--method", "rtn", "--group-size", "32", "--device", "cpu",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert main([*argv, "--overwrite"]) == 0
    assert is_lmcompress_checkpoint(out)
