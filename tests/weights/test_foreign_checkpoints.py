"""An AutoAWQ GEMM checkpoint packed by hand the way AutoAWQ's ``WQLinear_GEMM.from_linear`` packs (not with our
packer): sharded safetensors with an index, float16 tensors, one module left unquantized through
``modules_to_not_convert``; ``load_quantized`` must reproduce a float model holding the dequantized weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny
from lmcompress.weights import WQLinear, load_quantized

pytestmark = pytest.mark.model

GROUP = 32
KEEP = "model.layers.0.mlp.down_proj"  # stored as a plain .weight


def _autoawq_pack(int_cols: np.ndarray) -> np.ndarray:
    """AutoAWQ's loop: ``[R, N]`` ints -> ``[R, N // 8]`` int32, column ``8c + order[i]`` in bits ``4i..4i+3``."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((int_cols.shape[0], int_cols.shape[1] // 8), dtype=np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= int_cols[:, col * 8 + order[i]].astype(np.uint32) << np.uint32(4 * i)
    return out.view(np.int32)


def _rtn(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Plain min/max asymmetric 4-bit groups of ``[N, K]``: codes ``[N, K]``, zeros ``[N, G]``, scales fp16."""
    w = weight.float().reshape(weight.shape[0], -1, GROUP)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-5).half().float()
    zero = (-lo / scale).round().clamp(0, 15)
    codes = (w / scale[..., None] + zero[..., None]).round().clamp(0, 15)
    return codes.reshape(weight.shape).numpy().astype(np.int64), zero.numpy().astype(np.int64), scale.half()


def test_reads_a_hand_packed_sharded_autoawq_checkpoint(tmp_path):
    model = tiny("qwen2").half()  # q/k/v biases
    reference = tiny("qwen2")  # float32: the dequantized weights exactly
    tensors: dict[str, torch.Tensor] = {}
    ref_state = {}
    for key, value in model.state_dict().items():
        name, _, leaf = key.rpartition(".")
        module = model.get_submodule(name) if name else model
        quantize = isinstance(module, torch.nn.Linear) and ".layers." in name and name != KEEP and leaf == "weight"
        if not quantize:
            tensors[key] = value.clone()
            ref_state[key] = value.float()
            continue
        codes, zeros, scales = _rtn(value)
        tensors[f"{name}.qweight"] = torch.from_numpy(_autoawq_pack(codes.T.copy()))
        tensors[f"{name}.qzeros"] = torch.from_numpy(_autoawq_pack(zeros.T.copy()))
        tensors[f"{name}.scales"] = scales.t().contiguous()
        deq = (torch.from_numpy(codes).float().reshape(codes.shape[0], -1, GROUP)
               - torch.from_numpy(zeros).float()[..., None]) * scales.float()[..., None]  # fmt: skip
        ref_state[key] = deq.reshape(value.shape)
    reference.load_state_dict(ref_state)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}  # fmt: skip
    for file, names in shards.items():
        save_file({k: tensors[k].contiguous() for k in names}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = model.config.to_dict()
    config["quantization_config"] = {"bits": 4, "group_size": GROUP, "modules_to_not_convert": [KEEP],
                                     "quant_method": "awq", "version": "gemm", "zero_point": True}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded, _ = load_quantized(tmp_path)
    assert sum(isinstance(m, WQLinear) for m in loaded.modules()) == 27
    assert type(loaded.get_submodule(KEEP)) is torch.nn.Linear
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = loaded.float()(ids).logits
        expected = reference(ids).logits
    assert (got - expected).abs().max() < 1e-5  # float32 on both sides
