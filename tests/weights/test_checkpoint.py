"""Checkpoints: identical outputs after save/load, the documented layout read back by an independent reader,
the exact quantization_config, clear errors for inconsistent folders, and atomic writes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ARCHS, calibration, tiny
from lmcompress._compat import decoder_layers
from lmcompress.errors import LMCompressError
from lmcompress.weights import AWQConfig, RTNConfig, load_quantized, quantize_, save_quantized
from lmcompress.weights.quantizer import quantize_weight

pytestmark = pytest.mark.model


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_gives_identical_outputs(arch, tokens, tmp_path):
    model = tiny(arch)
    quantize_(model, RTNConfig(group_size=32), progress=False)
    with torch.no_grad():
        expected = model(tokens).logits
    save_quantized(model, tmp_path / "ckpt")
    loaded, tokenizer = load_quantized(tmp_path / "ckpt")
    assert tokenizer is None
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)


def test_awq_checkpoint_round_trip_and_config(tokens, tmp_path):
    model = tiny("qwen2")  # q/k/v projections with biases
    quantize_(
        model,
        AWQConfig(group_size=32, n_grid=5, clip_grid=10),
        calibration=calibration(2, 16),
        progress=False,
    )
    with torch.no_grad():
        expected = model(tokens).logits
    folder = save_quantized(model, tmp_path / "awq")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None,
    }  # fmt: skip
    loaded, _ = load_quantized(folder)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)
    assert loaded.config.quantization_config["group_size"] == 32


# ---------------------------------------------------------------- an independent reader of the documented layout


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader: 8-byte little-endian header size, JSON header, raw little-endian data."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    kinds = {"I32": np.int32, "F16": np.float16, "F32": np.float32, "BF16": np.uint16, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + size + start : 8 + size + end], dtype=kinds[info["dtype"]]).reshape(
            info["shape"]
        )
    return out


def decode_awq_gemm(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group: int):
    """Per the AutoAWQ GEMM layout: nibble i of qweight[k, c] is the code of output column 8c + [0,2,4,6,1,3,5,7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    k_dim, words = qweight.shape
    codes = np.zeros((k_dim, words * 8), dtype=np.int64)
    zeros = np.zeros((qzeros.shape[0], words * 8), dtype=np.int64)
    for i in range(8):
        codes[:, order[i] :: 8] = (qweight.astype(np.int64) >> (4 * i)) & 0xF
        zeros[:, order[i] :: 8] = (qzeros.astype(np.int64) >> (4 * i)) & 0xF
    diff = (codes - np.repeat(zeros, group, axis=0)).astype(np.float32)
    weight = diff * np.repeat(scales.astype(np.float32), group, axis=0)
    return codes, weight  # both [in, out]


def test_saved_layout_decodes_with_an_independent_reader(tmp_path):
    model = tiny("llama")
    originals = {
        name: m.weight.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"
    }
    quantize_(model, RTNConfig(group_size=32), progress=False)
    folder = save_quantized(model, tmp_path / "ckpt")
    tensors = read_safetensors(folder / "model.safetensors")
    assert len(originals) == 28
    for name, w in originals.items():
        expected = quantize_weight(w, 4, 32)
        codes, weight = decode_awq_gemm(
            tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], 32
        )  # fmt: skip
        assert tensors[f"{name}.qweight"].dtype == np.int32 and tensors[f"{name}.scales"].dtype == np.float16
        assert np.array_equal(codes, expected.codes.t().numpy())
        assert np.array_equal(weight, expected.dequantize().t().numpy())
        # and the rebuilt model multiplies with exactly that weight
    loaded, _ = load_quantized(folder)
    x = torch.randn(3, 64)
    proj = decoder_layers(loaded)[1].mlp.up_proj
    _, w_up = decode_awq_gemm(
        *(tensors[f"model.layers.1.mlp.up_proj.{s}"] for s in ("qweight", "qzeros", "scales")), 32
    )
    assert torch.allclose(proj(x), x @ torch.from_numpy(w_up), atol=1e-5)


# ---------------------------------------------------------------- bad folders and atomic writes


@pytest.fixture
def saved(tmp_path):
    model = tiny("llama")
    quantize_(model, RTNConfig(group_size=32), progress=False)
    return save_quantized(model, tmp_path / "ckpt"), model


def _edit_config(folder: Path, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key in ("bits", "group_size", "version"):
            data["quantization_config"][key] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_config_and_tensors_that_disagree(saved):
    folder, _ = saved
    _edit_config(folder, group_size=64)
    with pytest.raises(LMCompressError, match=r"qzeros has shape \(2, 8\).*group_size=64.*need \(1, 8\)"):
        load_quantized(folder)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bits": 8}, "bits=8 is not supported; allowed: 4"),
        ({"version": "gemv"}, "version='gemv' is not supported; allowed: gemm"),
        ({"model_type": "gpt_neox"}, "architecture 'gpt_neox' is not supported by AWQ; supported:"),
    ],
)
def test_unsupported_checkpoints(saved, change, match):
    folder, _ = saved
    if "model_type" in change:  # keep a config transformers can parse, with an architecture we lack
        data = json.loads((folder / "config.json").read_text())
        data = {"model_type": "gpt_neox", "quantization_config": data["quantization_config"]}
        (folder / "config.json").write_text(json.dumps(data))
    else:
        _edit_config(folder, **change)
    with pytest.raises(LMCompressError, match=match):
        load_quantized(folder)


def test_missing_packed_tensor(saved):
    from safetensors.torch import load_file, save_file

    folder, _ = saved
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.2.self_attn.k_proj.qweight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LMCompressError, match=r"lacks model\.layers\.2\.self_attn\.k_proj\.qweight"):
        load_quantized(folder)


def test_failed_save_leaves_nothing(saved, tmp_path):
    _, model = saved

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    target = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, target, tokenizer=BrokenTokenizer())
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_existing_output_needs_overwrite(saved, tokens):
    folder, model = saved
    with pytest.raises(LMCompressError, match="exists and is not empty"):
        save_quantized(model, folder)
    save_quantized(model, folder, overwrite=True)
    assert (folder / "model.safetensors").is_file()


def test_float16_storage(saved, tmp_path, tokens):
    _, model = saved
    folder = save_quantized(model, tmp_path / "fp16", dtype=torch.float16)
    tensors = read_safetensors(folder / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == np.float16
    assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == np.float16
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    loaded, _ = load_quantized(folder, dtype=torch.float32)
    assert loaded.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, model(tokens).logits, atol=5e-3, rtol=1e-2)


def test_save_requires_a_quantized_model(tmp_path):
    with pytest.raises(LMCompressError, match="run quantize_"):
        save_quantized(tiny("llama"), tmp_path / "x")


def test_tied_head_is_stored_once(tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    config = tiny("llama").config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_(model, RTNConfig(group_size=32), progress=False)
    for dtype in (None, torch.float16):
        folder = save_quantized(model, tmp_path / f"tied-{dtype}", dtype=dtype)
        assert "lm_head.weight" not in read_safetensors(folder / "model.safetensors")
        loaded, _ = load_quantized(folder, dtype=torch.float32)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        with torch.no_grad():
            expected = model(tokens).logits
            got = loaded(tokens).logits
        assert torch.equal(got, expected) if dtype is None else torch.allclose(got, expected, atol=5e-3, rtol=1e-2)
