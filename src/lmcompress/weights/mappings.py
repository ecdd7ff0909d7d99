"""AWQ architecture support as data: which operator's output is scaled down so which linears' inputs can be
scaled up, per ``model_type``.

Each :class:`ScaleGroup` says: divide the output channels of ``prev`` (an RMSNorm's weight, or some output rows
of a linear) by ``s`` and multiply the input columns of every linear in ``linears`` by ``s``; the model's float
function is unchanged, and ``s`` is searched to minimize the error of ``inspect``'s output (module paths are
relative to one decoder layer). Linear-to-linear groups apply only "when shapes allow": the rows of ``prev``
that feed the linears (``prev_part``) must number exactly their ``in_features`` (e.g. ``v_proj -> o_proj``
needs as many KV heads as query heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._compat import kv_geometry, text_config
from ..errors import LMCompressError

#: ``prev_part`` values: the trailing output rows of ``prev`` that feed the group's linears.
PREV_PARTS = ("all", "v", "up")


@dataclass(frozen=True)
class ScaleGroup:
    """One smoothing pair.

    Attributes:
        prev: the norm or linear whose output channels are divided by ``s``.
        linears: linears whose input columns are multiplied by ``s`` (they all read ``prev``'s output).
        inspect: module whose output measures the quantization loss (``None``: the single linear).
        prev_part: which output rows of a linear ``prev`` feed ``linears``: ``all``; ``v``, the last
            ``num_key_value_heads * head_dim`` rows of a fused qkv projection; ``up``, the last
            ``intermediate_size`` rows of a fused gate/up projection.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    prev_part: str = "all"


@dataclass(frozen=True)
class ArchMapping:
    """Scale groups of one architecture.

    Attributes:
        groups: the groups, in search order.
        no_clip: linears the clip search skips (they produce queries or keys, whose error the q.k product
            amplifies, as in llm-awq).
        norm_offset: the architecture's RMSNorm multiplies by ``norm_offset + weight`` (Gemma: 1).
    """

    groups: tuple[ScaleGroup, ...]
    no_clip: tuple[str, ...]
    norm_offset: float = 0.0


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

LLAMA_LIKE = ArchMapping(
    groups=(
        ScaleGroup("input_layernorm", _QKV, inspect="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

PHI3 = ArchMapping(
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), inspect="self_attn"),
        ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), prev_part="v"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), inspect="mlp"),
        ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), prev_part="up"),
    ),
    no_clip=("self_attn.qkv_proj",),
)

# Gemma 3: pre- and post-norms around both blocks; the pre-norms feed the linears. Its RMSNorm scales by
# (1 + weight), so smoothing sets weight' = (1 + weight) / s - 1.
GEMMA3 = ArchMapping(
    groups=(
        ScaleGroup("input_layernorm", _QKV, inspect="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    norm_offset=1.0,
)

AWQ_MAPPINGS: dict[str, ArchMapping] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,  # q_norm/k_norm act after q_proj/k_proj, so input scaling leaves them untouched
    "phi3": PHI3,
    "gemma3_text": GEMMA3,
}


def supported_architectures() -> list[str]:
    return sorted(AWQ_MAPPINGS)


def mapping_for(config: Any) -> ArchMapping:
    """The mapping of a model config's ``model_type``.

    Raises:
        LMCompressError: the architecture is not in the table (the message lists those that are).
    """
    model_type = getattr(text_config(config), "model_type", None)
    if model_type not in AWQ_MAPPINGS:
        raise LMCompressError(
            f"architecture {model_type!r} is not supported by AWQ; supported: {', '.join(supported_architectures())}"
        )
    return AWQ_MAPPINGS[model_type]


def prev_part_rows(group: ScaleGroup, prev_out_features: int, config: Any) -> int:
    """Number of trailing output rows of a linear ``prev`` that feed ``group.linears``."""
    if group.prev_part == "all":
        return prev_out_features
    cfg = text_config(config)
    if group.prev_part == "v":
        _, _, kv_heads, head_dim = kv_geometry(cfg)
        return kv_heads * head_dim
    if group.prev_part == "up":
        return int(cfg.intermediate_size)
    raise LMCompressError(f"prev_part={group.prev_part!r} is unknown; allowed: {', '.join(PREV_PARTS)}")
