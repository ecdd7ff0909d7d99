"""Retrofit DMS onto a model (``lmcompress dms retrofit MODEL OUT``): logit distillation from the frozen
uncompressed model.

Each step takes ``seq_len`` tokens of the Lee corpus (gensim's wheel), runs the teacher (a frozen copy of the
model without DMS) and the student in DMS training mode (:mod:`lmcompress.kv.evict.dms_train`:
Gumbel-sigmoid decisions, straight-through evicted fraction), and minimises

    forward KL(teacher || student) over next-token distributions + aux_weight * relu(target - evicted fraction)

where the target fraction rises linearly from 0 to ``1 - 1/ratio`` over the steps. By default only the decision
parameters train (the borrowed query rows ``q_proj.weight[g * G * D + D - 1]``, or the separate-alpha norm and
projection); ``train="full"`` fine-tunes every weight. The output folder is a normal Hugging Face checkpoint with
the DMS keys in ``config.json`` plus ``dms_retrofit_state.pt`` (step, optimizer and RNG state, options,
history), written every ``save_every`` steps; running again with the same OUT resumes from the last saved step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ... import _compat
from ...errors import LMCompressError, check_choice, check_positive_int
from .dms_config import DMSSettings

STATE_FILE = "dms_retrofit_state.pt"


@dataclass(frozen=True)
class RetrofitOptions:
    """Options of a retrofit run (saved with the checkpoint; a resumed run must use the same ones, ``steps``
    and ``save_every`` aside)."""

    ratio: float = 4.0
    steps: int = 100
    seq_len: int = 256
    lr: float = 1e-2
    window_size: int = 16
    alpha_scale: float = 1.0
    initial_alpha_offset: float = 5.0
    separate_alpha: bool = False
    alpha_per: str = "head"
    tau: float = 0.1
    aux_weight: float = 1.0
    train: str = "decisions"
    save_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not self.ratio >= 1:
            raise LMCompressError(f"--ratio={self.ratio!r} is not allowed; it must be a number >= 1 "
                                  "(the target compression, 4 = keep a quarter)")
        for name in ("steps", "seq_len", "save_every"):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.seq_len < 2:
            raise LMCompressError(f"--seq-len={self.seq_len} is not allowed; it must be >= 2")
        if not (self.lr > 0 and self.tau > 0 and self.aux_weight >= 0):
            raise LMCompressError(f"lr={self.lr}, tau={self.tau}, aux_weight={self.aux_weight}: lr and tau must "
                                  "be > 0, aux_weight >= 0")
        check_choice("--train", self.train, ("decisions", "full"))
        self.settings()  # validates window, scale, offset, alpha_per

    def settings(self) -> DMSSettings:
        return DMSSettings(self.window_size, self.alpha_scale, self.initial_alpha_offset, self.separate_alpha,
                           self.alpha_per)

    def target_fraction(self, step: int) -> float:
        """Target evicted fraction at 0-based ``step``: linear from ``1/steps`` of the final to the final
        ``1 - 1/ratio``."""
        return (1.0 - 1.0 / self.ratio) * min(1.0, (step + 1) / self.steps)

    def same_run(self, other: RetrofitOptions) -> bool:
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        for key in ("steps", "save_every"):
            a.pop(key)
            b.pop(key)
        return a == b


def corpus_ids(tokenizer: Any, vocab_size: int, seq_len: int) -> torch.Tensor:
    """``[N]`` token ids of the Lee corpus (byte values modulo the vocabulary for tokenizer-less tiny models)."""
    from ...eval.text import english_text

    text = english_text("lee")
    if tokenizer is None:
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab_size
    else:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise LMCompressError(f"--seq-len={seq_len} is longer than the corpus ({ids.numel()} tokens)")
    return ids


def batch_at(ids: torch.Tensor, step: int, seq_len: int) -> torch.Tensor:
    """``[1, seq_len]``: the step's window of the corpus (consecutive windows, wrapping)."""
    windows = (ids.numel() - 1) // seq_len
    start = (step % windows) * seq_len
    return ids[start : start + seq_len].unsqueeze(0)


def decision_parameters(model: torch.nn.Module, options: RetrofitOptions) -> tuple[list[torch.nn.Parameter],
                                                                                      list[Any]]:
    """Freeze ``model`` except the decision parameters; returns ``(parameters, gradient hook handles)``."""
    from .dms_hooks import attach_separate_alpha

    for p in model.parameters():
        p.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    handles = []
    if options.separate_alpha:
        for module in attach_separate_alpha(model):
            for sub in (module.dms_proj_alpha_norm, module.dms_proj_alpha):
                for p in sub.parameters():
                    p.requires_grad_(True)
                    params.append(p)
        return params, handles
    _, heads, kv_heads, head_dim = _compat.kv_geometry(model.config)
    groups = heads // kv_heads
    for module in _compat.attention_modules(model):
        w = module.q_proj.weight
        mask = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        mask[[g * groups * head_dim + head_dim - 1 for g in range(kv_heads)]] = 1
        w.requires_grad_(True)
        handles.append(w.register_hook(lambda grad, _m=mask: grad * _m))
        params.append(w)
    return params, handles


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions, ``[B, S, V]`` each."""
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def retrofit(model_name: str, out: str | Path, options: RetrofitOptions, *, progress: bool = True,
             on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Retrofit DMS onto ``model_name`` into folder ``out`` (resuming from ``out``'s last saved step if it holds
    a retrofit state). ``on_step(step, record)`` is called after each step (tests interrupt runs through it).

    Returns:
        the run summary: steps done, tokens seen, wall time, the last step's loss terms, where it resumed.
    """
    from tqdm.auto import tqdm

    from ...models import load_model
    from .dms_load import load_dms_model

    out = Path(out)
    state_path = out / STATE_FILE
    resumed_from = 0
    saved = None
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        previous = RetrofitOptions(**saved["options"])
        if not previous.same_run(options):
            raise LMCompressError(f"{out} holds a retrofit with other options ({previous}); use another OUT or the "
                                  "same options")
        if saved["model"] != model_name:
            raise LMCompressError(f"{out} holds a retrofit of {saved['model']!r}, not {model_name!r}")
        resumed_from = saved["step"]
    teacher_model, tokenizer = load_model(model_name)
    # the teacher stays frozen with the original weights (the borrowed query rows change while training)
    model = load_dms_model(out)[0] if saved is not None else copy.deepcopy(teacher_model)
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    model.train(False)
    for key, value in options.settings().to_config().items():
        setattr(model.config, key, value)
    if options.train == "full":
        if options.separate_alpha:
            from .dms_hooks import attach_separate_alpha

            attach_separate_alpha(model)
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        handles: list[Any] = []
    else:
        params, handles = decision_parameters(model, options)
    optimizer = torch.optim.Adam(params, lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    history: list[dict] = []
    wall = 0.0
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        history, wall = saved["history"], saved["wall_s"]
    ids = corpus_ids(tokenizer, _compat.text_config(model.config).vocab_size, options.seq_len)
    settings = options.settings()
    from .dms_train import dms_training

    bar = tqdm(total=options.steps, initial=resumed_from, desc="dms retrofit", disable=not progress)
    step = resumed_from
    try:
        while step < options.steps:
            t0 = time.perf_counter()
            batch = batch_at(ids, step, options.seq_len)
            with torch.no_grad():
                teacher_logits = teacher_model(batch).logits
            with dms_training(model, settings, tau=options.tau, generator=generator) as st:
                student_logits = model(batch).logits
                fraction = st.evicted_fraction()
            target = options.target_fraction(step)
            kl = forward_kl(teacher_logits, student_logits)
            aux = torch.relu(target - fraction)
            loss = kl + options.aux_weight * aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            wall += time.perf_counter() - t0
            record = {"step": step, "kl": float(kl.detach()), "evicted": float(fraction.detach()), "target": target,
                      "loss": float(loss.detach())}
            history.append(record)
            bar.update(1)
            bar.set_postfix(kl=f"{record['kl']:.4f}", evicted=f"{record['evicted']:.2f}", target=f"{target:.2f}")
            if step % options.save_every == 0 or step == options.steps:
                save_checkpoint(model, tokenizer, out, options, model_name, step, optimizer, generator,
                                history, wall)
            if on_step is not None:
                on_step(step, record)
    finally:
        bar.close()
        for h in handles:
            h.remove()
    last = history[-1] if history else {}
    return {"model": model_name, "out": str(out), "steps": step, "resumed_from": resumed_from,
            "tokens": step * options.seq_len, "wall_s": round(wall, 2), **{k: last.get(k) for k in
                                                                          ("kl", "evicted", "target")}}


def save_checkpoint(model: torch.nn.Module, tokenizer: Any, out: Path, options: RetrofitOptions, model_name: str,
                    step: int, optimizer: torch.optim.Optimizer, generator: torch.Generator, history: list[dict],
                    wall: float) -> None:
    """Write the HF folder (weights, config with the DMS keys, tokenizer) and the retrofit state.

    Everything is written to ``OUT/.saving`` first and moved into place file by file (each move atomic), the
    state file last: a run killed while saving resumes from the previous complete state; in the short window
    between the moves it may resume with the newer weights but the older step and optimizer state."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with _compat.detached_hf_quantizer(model):
        model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config.update(options.settings().to_config())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    torch.save({"step": step, "model": model_name, "options": dataclasses.asdict(options),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "history": history,
                "wall_s": wall}, tmp / STATE_FILE)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == STATE_FILE):
        path.replace(out / path.name)
    tmp.rmdir()
