"""One model over several devices (issue 14, QAQ's ``device_configs``): an explicit per-layer map dispatched
through accelerate (all entries ``cpu`` here, so the plumbing runs in CI: accelerate's hooks are really on every
mapped module), eviction, quantization and ``generate()`` through it give exactly the undispatched model's tokens,
kept tokens and bytes, every cache layer's storage lives on its layer's device, and bad maps fail with one line.
(On a CPU machine every device is the CPU, so this cannot show tensors moving between GPUs.)"""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import AlignDevicesHook

from lmcompress._compat import cache_kwargs
from lmcompress.cli import main
from lmcompress.errors import LMCompressError
from lmcompress.eval.pipeline import answer
from lmcompress.kv.cache import CompressedCache
from lmcompress.kv.parse import parse_method
from lmcompress.models import load_model
from lmcompress.placement import Placement, model_devices, parse_placement

pytestmark = pytest.mark.model

LAYERS = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm", "model.rotary_emb",
          "lm_head"]
SPECS = ("snapkv:ratio=0.5", "int4:group_size=16", "kivi:group_size=16", "streaming_llm:ratio=0.5+int4:group_size=16")


@pytest.fixture(scope="module")
def placed():
    placement = parse_placement(device_map={name: "cpu" for name in LAYERS})
    model, _ = load_model("tiny-llama", placement=placement)
    return model


def test_explicit_map_dispatches_with_hooks_on_every_module(placed):
    assert placed.hf_device_map == {name: "cpu" for name in LAYERS}
    modules = dict(placed.named_modules())
    for name in LAYERS:
        assert isinstance(modules[name]._hf_hook, AlignDevicesHook), name
        assert modules[name]._hf_hook.execution_device == "cpu"
    assert {p.device.type for p in placed.parameters()} == {"cpu"}  # nothing left on the meta device
    assert model_devices(placed) == ["cpu"]


@pytest.mark.parametrize("spec", SPECS)
def test_generate_through_the_map_matches_the_plain_model(placed, spec):
    plain, _ = load_model("tiny-llama")
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(3))
    got = []
    for model in (plain, placed):
        cache = CompressedCache(model, parse_method(spec))
        out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=6, do_sample=False)
        got.append((out.tolist(), cache.nbytes, cache.held_tokens()))
        if model is placed:
            for i, layer in enumerate(cache.layers):  # each layer's storage where that layer runs
                where = next(placed.model.layers[i].parameters()).device
                assert {t.device for t in layer.tensors()} == {where}
    assert got[0] == got[1]
    evicts = spec.startswith(("snapkv", "streaming_llm"))
    assert (max(got[1][2]) < 96 + 5) == evicts  # the eviction specs really evicted, the others kept every token


def test_pipeline_answer_eager_and_static_through_the_map(placed):
    plain, _ = load_model("tiny-llama")
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(4))
    spec = parse_method("streaming_llm:ratio=0.5")
    runs = [answer(m, ids[:, :-8], ids[:, -8:], spec, max_new_tokens=5, eos_token_ids=[], decode=d)
            for m in (plain, placed) for d in ("eager", "static")]
    assert len({tuple(r.token_ids) for r in runs}) == 1
    assert len({r.kv_bytes for r in runs}) == 1


def test_static_decode_refuses_a_model_spread_over_two_gpus():
    from lmcompress.eval.graph_decode import StaticDecoder

    model, _ = load_model("tiny-llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    assert model_devices(model) == ["cuda:0", "cuda:1"]
    cache = CompressedCache(model, parse_method("none"))
    with pytest.raises(LMCompressError, match=r"static decode runs a fixed-shape step on one device .* spread over "
                                              r"cuda:0, cuda:1; allowed: decode='eager'"):
        StaticDecoder(model, cache, 4)


def test_caps_fill_the_devices_and_a_model_over_the_caps_is_an_error():
    model, _ = load_model("tiny-llama", placement=Placement(caps={"cpu": 1 << 30}))
    assert set(map(str, model.hf_device_map.values())) == {"cpu"}
    with pytest.raises(LMCompressError, match=r"devices \{cpu: 0.00GiB\}: the model does not fit these caps"):
        load_model("tiny-llama", placement=parse_placement(devices={"cpu": "4KiB"}))


GRID = "device: cpu\nmodels: [tiny-llama]\nkv: [none]\ntasks: [{decode_cost: {length: 32, new_tokens: 2}}]\n"


@pytest.mark.parametrize(("extra", "message"), [
    ("devices: {tpu:0: 20GiB}", "devices='tpu:0' is not a device name; allowed: cpu, cuda, cuda:N"),
    ("devices: {cuda:0: 20GiB}", "devices='cuda:0': no CUDA GPU is available on this machine"),
    ("devices: {cpu: 20 gigs}", "devices.cpu='20 gigs' is not a size; allowed:"),
    ("device_map: {model.embed_tokens: cpu, model.layers.0: tpu}", "device_map.model.layers.0='tpu' is not a device"),
    ("device_map: {model.layers.9: cpu, model: cpu}", "device_map: 'model.layers.9' is not a module of the model"),
    ("device_map: {model: cpu}", "device_map: no entry covers 'lm_head.weight'"),
    ("devices: {cpu: 1GiB}\ndevice_map: {model: cpu}", "devices and device_map are both given"),
])
def test_bad_maps_exit_2_with_one_line_naming_the_value(tmp_path, capsys, extra, message):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID + extra + "\n")
    assert main(["run", str(grid), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert str(grid) in err[0]
    assert not (tmp_path / "out").exists()


def test_dry_run_names_the_devices_a_model_is_spread_over(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID + "devices: {cpu: 1GiB}\n")
    assert main(["run", str(grid), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "1 cells on cpu/float32, each model spread over cpu" in capsys.readouterr().out
