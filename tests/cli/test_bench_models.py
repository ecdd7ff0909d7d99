"""Several models in one ``lmcompress bench`` run: one table with a model column, store rows keyed apart, a DMS
checkpoint paired with ``none`` and the ``dms`` specs (other models with the rest), a bad model in the list named
before anything runs, and a DMS folder's identity keyed by its ``dms_*`` settings."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from lmcompress.cli import build_grid, build_parser, main
from lmcompress.runner.provenance import model_identity

TASK = "decode_cost:length=48,new_tokens=3"
WINDOW = 4


def _args(*argv: str):
    return build_parser().parse_args(["bench", *argv])


def dms_folder(path, arch: str = "llama") -> str:
    """A tiny checkpoint folder with DMS keys whose decisions all evict: ``dms_initial_alpha_offset=-1e4`` makes
    every logit positive, so after any step each head holds exactly the newest ``WINDOW`` tokens."""
    from lmcompress.models import tiny_model

    model = tiny_model(arch, seed=1)
    model.config.update({"dms_window_size": WINDOW, "dms_alpha_scale": 1e-3, "dms_initial_alpha_offset": -1e4,
                         "dms_separate_alpha": False, "dms_alpha_per": "head"})
    model.save_pretrained(path)
    return str(path)


def store_rows(path) -> list[tuple[str, dict]]:
    db = sqlite3.connect(str(path))
    try:
        rows = db.execute("SELECT key, spec FROM runs WHERE status = 'ok'").fetchall()
    finally:
        db.close()
    return [(k, json.loads(s)) for k, s in rows]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("lmcompress: error: ")
    return err


def test_comma_list_and_repeated_flag_give_the_same_cells():
    a = build_grid(_args("--model", "tiny-llama,tiny-qwen3", "--methods", "none,snapkv", "--ratios", "0.5",
                         "--tasks", TASK))
    b = build_grid(_args("--model", "tiny-llama", "--model", "tiny-qwen3", "--methods", "none,snapkv",
                         "--ratios", "0.5", "--tasks", TASK))
    assert [(r.model, r.kv.label()) for r in a] == [(r.model, r.kv.label()) for r in b] == [
        ("tiny-llama", "none"), ("tiny-llama", a[1].kv.label()), ("tiny-qwen3", "none"), ("tiny-qwen3", a[1].kv.label())]
    assert len({r.key() for r in a}) == 4


@pytest.mark.model
def test_two_models_one_run_one_table_rows_keyed_apart(tmp_path, capsys):
    out, store = tmp_path / "out", tmp_path / "s.sqlite"
    argv = ["bench", "--model", "tiny-llama,tiny-qwen3", "--methods", "none,streaming_llm", "--ratios", "0.5",
            "--tasks", TASK, "--out", str(out), "--store", str(store), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    summary_table = text.split("\n\n")[0]
    task_table = text.split("Tasks:\n")[1].split("\n\n")[0]
    assert summary_table.startswith("| model | method |")
    table = [line for line in summary_table.splitlines() if line.startswith("| tiny-")]
    assert [line.split(" | ")[:2] for line in table] == [
        ["| tiny-llama", "none"], ["| tiny-llama", "streaming_llm"], ["| tiny-qwen3", "none"],
        ["| tiny-qwen3", "streaming_llm"]]
    assert "| model | KV spec | task |" in task_table
    assert sum(line.startswith("| tiny-qwen3 | ") for line in task_table.splitlines()) == 2
    rows = store_rows(store)
    assert len(rows) == 4 and len({k for k, _ in rows}) == 4
    assert {(s["model"], s["kv_label"]) for _, s in rows} == {
        (m, lbl) for m in ("tiny-llama", "tiny-qwen3") for lbl in ("none", "streaming_llm(ratio=0.5)")}
    results = json.loads((out / "results.json").read_text())
    kv = {(r["spec"]["model"], r["spec"]["kv_label"]): r["result"]["costs"]["kv_bytes"] for r in results["runs"]}
    for row in results["summary"]:  # measured KV bytes; "KV vs none" against the same model's none row
        assert row["kv_bytes"] == kv[(row["model"], row["label"])]
        assert row["kv_fraction"] == pytest.approx(kv[(row["model"], row["label"])] / kv[(row["model"], "none")])
        assert (row["kv_fraction"] == 1.0) == (row["label"] == "none")
        assert row["ttft_s"] > 0 and row["decode_tok_s"] > 0 and row["peak_mem_bytes"] is not None
    assert main(argv) == 0  # a rerun computes nothing: every cell is in the store under its own key
    assert "4 runs, 4 already in" in capsys.readouterr().err


@pytest.mark.model
def test_vanilla_presses_and_a_dms_checkpoint_in_one_table(tmp_path, capsys):
    dms = dms_folder(tmp_path / "dms")
    out, store = tmp_path / "out", tmp_path / "s.sqlite"
    assert main(["bench", "--model", f"tiny-llama,{dms}", "--methods", "none,streaming_llm,dms", "--ratios", "0.5",
                 "--tasks", TASK, "--out", str(out), "--store", str(store), "--quiet"]) == 0
    capsys.readouterr()
    rows = {(s["model"], s["kv_label"]) for _, s in store_rows(store)}
    assert rows == {("tiny-llama", "none"), ("tiny-llama", "streaming_llm(ratio=0.5)"), (dms, "none"), (dms, "dms()")}
    runs = json.loads((out / "results.json").read_text())["runs"]
    got = {r["spec"]["model"] + " " + r["spec"]["kv_label"]: r["result"] for r in runs}
    held = got[f"{dms} dms()"]["details"]["held_tokens"]
    # every decision evicts: of the 32 context tokens each head keeps the window; the 16-token question is
    # appended with compression paused (as for every method)
    assert held == [WINDOW + 16] * 4
    d, layers, kv_heads = 16, 4, 2
    # after the prompt: fp32 keys + values, int32 positions and float32 marks per held token and head, plus the
    # storage reserved for the 3 decoded tokens
    assert got[f"{dms} dms()"]["costs"]["kv_bytes"] == layers * kv_heads * (WINDOW + 16 + 3) * (2 * d * 4 + 4 + 4)
    assert got[f"{dms} none"]["costs"]["kv_bytes"] == got["tiny-llama none"]["costs"]["kv_bytes"]
    summary = {(r["model"], r["label"]): r for r in json.loads((out / "results.json").read_text())["summary"]}
    assert summary[(dms, "dms()")]["kv_fraction"] == pytest.approx(
        got[f"{dms} dms()"]["costs"]["kv_bytes"] / got[f"{dms} none"]["costs"]["kv_bytes"])  # its own none row


def test_bad_model_in_the_list_exits_2_naming_it_before_anything_runs(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    err = one_line_error(capsys, ["bench", "--model", f"tiny-llama,{tmp_path / 'nope'}", "--methods", "none",
                                  "--tasks", TASK, "--out", str(tmp_path / "out"), "--store", str(store), "--quiet"])
    assert str(tmp_path / "nope") in err
    assert not store.exists()


def test_dms_spec_without_a_dms_checkpoint_and_models_left_without_methods(tmp_path, capsys):
    base = ["--tasks", TASK, "--out", str(tmp_path / "out"), "--quiet"]
    err = one_line_error(capsys, ["bench", "--model", "tiny-llama,tiny-qwen3", "--methods", "none,dms", *base])
    assert "no model of tiny-llama, tiny-qwen3 is a DMS checkpoint" in err
    dms = dms_folder(tmp_path / "dms")
    capsys.readouterr()  # (the folder's save progress)
    err = one_line_error(capsys, ["bench", "--model", f"tiny-llama,{dms}", "--methods", "dms", *base])
    assert "model 'tiny-llama' would run no method" in err
    err = one_line_error(capsys, ["bench", "--model", "tiny-llama,tiny-llama", "--methods", "none", *base])
    assert "--model lists 'tiny-llama' twice" in err


def test_bad_dms_folder_in_the_list_exits_2(tmp_path, capsys):
    dms = dms_folder(tmp_path / "dms")
    config = json.loads((tmp_path / "dms" / "config.json").read_text())
    config["dms_window_size"] = 0
    (tmp_path / "dms" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # (the folder's save progress)
    err = one_line_error(capsys, ["bench", "--model", f"tiny-llama,{dms}", "--methods", "none,dms", "--tasks", TASK,
                                  "--out", str(tmp_path / "out"), "--quiet"])
    assert f"model {dms!r}" in err and "dms_window_size=0 is not allowed" in err


def test_dms_folder_identity_covers_its_dms_keys(tmp_path):
    """Two folders with the same files, sizes and mtimes but another ``dms_window_size`` key apart."""
    a = dms_folder(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    for f in (tmp_path / "a").iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    config = (b / "config.json").read_text().replace(f'"dms_window_size": {WINDOW}', '"dms_window_size": 7')
    assert config != (b / "config.json").read_text()
    (b / "config.json").write_text(config)
    for f in (tmp_path / "a").iterdir():
        st = f.stat()
        os.utime(b / f.name, ns=(st.st_atime_ns, st.st_mtime_ns))
    ia, ib = model_identity(a), model_identity(str(b))
    assert ia["dms"]["dms_window_size"] == WINDOW and ib["dms"]["dms_window_size"] == 7
    assert {k: v for k, v in ia.items() if k not in ("name", "dms")} == {
        k: v for k, v in ib.items() if k not in ("name", "dms")}  # the stamps alone do not tell them apart
    assert "dms" not in model_identity("tiny-llama")


def test_grid_file_pairs_models_and_specs_the_same_way(tmp_path):
    from lmcompress.runner.grid import GridError, load_grid

    dms = dms_folder(tmp_path / "dms")
    grid = tmp_path / "g.yaml"
    grid.write_text(f"models: [tiny-llama, {dms}]\nratios: [0.5]\nkv: [none, snapkv, dms+int4]\n"
                    "tasks:\n  - decode_cost: {length: 48, new_tokens: 3}\n")
    runs = load_grid(grid).runs
    assert [(r.model, r.kv.label()) for r in runs] == [
        ("tiny-llama", "none"), ("tiny-llama", runs[1].kv.label()), (dms, "none"), (dms, "dms()+int(bits=4)")]
    assert runs[1].kv.label().startswith("snapkv")
    grid.write_text("models: [tiny-llama]\nkv: [dms]\ntasks: [decode_cost]\n")
    with pytest.raises(GridError, match=r"g.yaml:1: models: the methods include dms but no model of tiny-llama"):
        load_grid(grid)
