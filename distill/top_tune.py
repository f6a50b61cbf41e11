"""Stage 2 of the teacher recipe: fine-tune the LLM blocks between the cut and the probe's layer.

The model is :class:`TopModel`: copies of blocks ``cut..layer`` (frozen base weights, LoRA on every
linear map), the final norm when the probe reads the final-norm output, and the stage-1 probe head
(standardiser fixed, weight and bias trainable: LP-FT, Kumar et al., 2022). Its input is the cached
per-token state at the cut (:mod:`darl_lite.distill.cut_cache`).

Why LoRA and not a full fine-tune: what the teacher needs beyond the base LLM ships inside the
package (<= 15 MB); rank-8 LoRA on 4 blocks is ~3 MB, the blocks themselves ~240 MB.

:func:`train_top` is resumable: the batch order of every epoch is a function of (seed, epoch), the
learning rate a function of the step, and a checkpoint (trainable tensors + AdamW moments,
safetensors, atomic) is written every ``checkpoint_every`` steps; a restarted run loads the newest
and skips the batches it covered. Stage 3 (WiSE-FT, Wortsman et al., 2022) is :func:`set_interpolation`:
``W0 + α·ΔW_lora`` in every block and ``(1−α)·head₁ + α·head₂``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm

from darl_lite.distill.cut_cache import CutCache, autocast
from darl_lite.distill.decoder_blocks import DecoderParts, last_token, run_blocks
from darl_lite.distill.graded_loss import graded_loss
from darl_lite.distill.llm_teacher import ProbeHead
from darl_lite.errors import InputError

logger = logging.getLogger(__name__)

StepHook = Callable[[int], None]


@dataclass(frozen=True)
class TopConfig:
    """How stage 2 trains (one config per seed)."""

    rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 2e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    warmup_ratio: float = 0.05
    max_steps: int | None = None
    grad_clip: float = 1.0
    loss: Literal["ce", "graded"] = "graded"
    ordinal_weight: float = 0.5
    confidence_weight: float = 0.1
    compute_dtype: str = "bfloat16"
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise InputError("TopConfig: rank, epochs, batch_size and checkpoint_every must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"TopConfig: max_steps must be None or >= 1; got {self.max_steps}")
        if not (self.lr > 0 and self.head_lr >= 0):
            raise InputError("TopConfig: lr must be > 0 and head_lr >= 0")


class LoraLinear(torch.nn.Module):
    """``y = base(x) + mix · (α/r) · x Aᵀ Bᵀ``; ``B`` starts at zero, so the start is the base model."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(base.in_features)
            self.lora_a.uniform_(-bound, bound, generator=generator)
        self.scaling = alpha / rank
        self.mix = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)
        return self.base(x) + delta * (self.scaling * self.mix)


class TopModel(torch.nn.Module):
    """Blocks ``cut..layer`` + probe head, from cached states at the cut; ``forward`` gives logits."""

    def __init__(
        self,
        parts: DecoderParts,
        cut: int,
        layer: int,
        head: ProbeHead,
        rank: int = 8,
        lora_alpha: float = 16.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= cut <= layer <= parts.n_layers:
            raise InputError(f"need 0 <= cut <= layer <= {parts.n_layers}; got cut={cut}, layer={layer}")
        if head.layer % (parts.n_layers + 1) != layer:
            raise InputError(f"the probe head reads layer {head.layer}, not {layer}")
        self.parts, self.cut, self.layer = parts, cut, layer
        self.rank, self.lora_alpha = rank, lora_alpha
        self.blocks = torch.nn.ModuleList(
            copy.deepcopy(parts.layers[i]) for i in range(cut, min(layer, parts.n_layers))
        )
        self.final_norm = copy.deepcopy(parts.norm) if layer == parts.n_layers else None
        for p in self.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        for block in self.blocks:
            for module in list(block.modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(module, child_name, LoraLinear(child, rank, lora_alpha, generator))
        self.register_buffer("mean", torch.from_numpy(head.mean.copy()))
        self.register_buffer("scale", torch.from_numpy(head.scale.copy()))
        self.head = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(head.weight))
            self.head.bias.copy_(torch.from_numpy(head.bias))
        self.temperature = head.temperature

    def lora_modules(self) -> dict[str, LoraLinear]:
        return {name: m for name, m in self.blocks.named_modules() if isinstance(m, LoraLinear)}

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """Trainable tensors by name (LoRA A/B, head), in a fixed order."""
        return {name: p for name, p in self.named_parameters() if "lora_" in name or name.startswith("head.")}

    def features(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden, _ = run_blocks(self.parts, self.blocks, states, mask)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return last_token(hidden, mask).float()

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mean, scale = self.get_buffer("mean"), self.get_buffer("scale")
        x = (self.features(states, mask) - mean) / scale
        return self.head(x.float())


def set_interpolation(
    model: TopModel, head1: ProbeHead, head2: tuple[NDArray[np.float32], NDArray[np.float32]], alpha: float
) -> None:
    """WiSE-FT at ``alpha``: blocks ``W0 + α·ΔW``, head ``(1−α)·head₁ + α·head₂``.

    ``alpha = 0`` is the stage-1 model (frozen blocks, probe head), ``alpha = 1`` the stage-2 model.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must lie in [0, 1]; got {alpha}")
    for module in model.lora_modules().values():
        module.mix = alpha
    with torch.no_grad():
        w = (1 - alpha) * head1.weight + alpha * head2[0]
        b = (1 - alpha) * head1.bias + alpha * head2[1]
        model.head.weight.copy_(torch.from_numpy(w.astype(np.float32)))
        model.head.bias.copy_(torch.from_numpy(b.astype(np.float32)))


def head_arrays(model: TopModel) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    return (model.head.weight.detach().cpu().numpy().copy(), model.head.bias.detach().cpu().numpy().copy())


def predict_logits(
    model: TopModel,
    cache: CutCache,
    rows: Sequence[int] | NDArray[np.int64],
    *,
    batch_size: int = 64,
    compute_dtype: str = "bfloat16",
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> NDArray[np.float32]:
    """Untempered logits ``(len(rows), C)`` of cache rows, in ``rows`` order."""
    dev = torch.device(device)
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows), model.head.out_features), np.float32)
    model.eval()
    bar = tqdm(total=len(rows), desc="top blocks", unit="pair", disable=not progress)
    with torch.no_grad(), autocast(dev, compute_dtype):
        for pos, states, mask in cache.batches(rows, batch_size):
            out[pos] = model(states.to(dev), mask.to(dev)).float().cpu().numpy()
            bar.update(len(pos))
    bar.close()
    return out


def batch_plan(lengths: NDArray[np.int32], batch_size: int, seed: int, epoch: int) -> list[NDArray[np.int64]]:
    """Batches of positions for one epoch: shuffled, length-bucketed (less padding), order shuffled."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    group = batch_size * 50
    batches: list[NDArray[np.int64]] = []
    for start in range(0, len(perm), group):
        block = perm[start : start + group]
        block = block[np.argsort(lengths[block], kind="stable")]
        batches.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i].astype(np.int64) for i in order]


@dataclass
class TrainOutcome:
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: TopModel,
    optimiser: torch.optim.Optimizer,
    losses: list[float],
    spec: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    named = model.trainable()
    tensors: dict[str, torch.Tensor] = {f"param.{n}": p.detach().cpu().contiguous() for n, p in named.items()}
    state = optimiser.state
    for n, p in named.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if p in state and key in state[p]:
                tensors[f"opt.{key}.{n}"] = torch.as_tensor(state[p][key]).detach().cpu().contiguous()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:06d}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    meta = ckpt_dir / f"step-{step:06d}.json"
    meta.with_suffix(".tmp").write_text(
        json.dumps({"step": step, "losses": losses, "spec": spec}), encoding="utf-8"
    )
    os.replace(meta.with_suffix(".tmp"), meta)
    for old in ckpt_dir.glob("step-*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


def _load_checkpoint(
    ckpt_dir: Path, model: TopModel, optimiser: torch.optim.Optimizer, spec: dict[str, Any]
) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    found = sorted(p for p in ckpt_dir.glob("step-*.safetensors") if p.with_suffix(".json").exists())
    if not found:
        return 0, []
    path = found[-1]
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    if meta.get("spec", spec) != spec:
        raise InputError(
            f"{path} is a checkpoint of another stage-2 configuration; delete {ckpt_dir} to start over "
            "or rerun with the configuration it was written with"
        )
    named = model.trainable()
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[f"param.{n}"])
    for n, p in named.items():
        if f"opt.step.{n}" in tensors:
            optimiser.state[p] = {
                "step": tensors[f"opt.step.{n}"],
                "exp_avg": tensors[f"opt.exp_avg.{n}"].clone(),
                "exp_avg_sq": tensors[f"opt.exp_avg_sq.{n}"].clone(),
            }
    logger.info("stage 2: resumed from %s (step %d)", path.name, meta["step"])
    return int(meta["step"]), list(meta["losses"])


def _loss(config: TopConfig, logits: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    if config.loss == "ce":
        return torch.nn.functional.cross_entropy(logits, grades)
    return graded_loss(
        logits, grades, ordinal_weight=config.ordinal_weight, confidence_weight=config.confidence_weight
    )


def train_top(
    model: TopModel,
    cache: CutCache,
    rows: NDArray[np.int64],
    grades: NDArray[np.int64],
    config: TopConfig,
    ckpt_dir: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    on_step: StepHook | None = None,
    progress: bool = True,
) -> TrainOutcome:
    """Train ``model``'s LoRA and head on cache ``rows`` with human ``grades``; resumable."""
    if len(rows) != len(grades) or len(rows) == 0:
        raise InputError(f"need one grade per training row (> 0); got {len(grades)} and {len(rows)}")
    dev = torch.device(device)
    model.to(dev)
    named = model.trainable()
    head_params = [p for n, p in named.items() if n.startswith("head.")]
    lora_params = [p for n, p in named.items() if not n.startswith("head.")]
    for p in named.values():
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": config.lr, "base": config.lr},
            {"params": head_params, "lr": config.head_lr, "base": config.head_lr},
        ],
        weight_decay=config.weight_decay,
    )
    per_epoch = math.ceil(len(rows) / config.batch_size)
    total = (
        per_epoch * config.epochs
        if config.max_steps is None
        else min(config.max_steps, per_epoch * config.epochs)
    )
    warmup = max(1, int(config.warmup_ratio * total))
    spec = {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}
    step, losses = _load_checkpoint(Path(ckpt_dir), model, optimiser, spec)
    outcome = TrainOutcome(steps=step, resumed_from=step, losses=losses)
    started = time.perf_counter()
    lengths = cache.lengths[rows]
    y_all = torch.from_numpy(np.asarray(grades, np.int64))
    bar = tqdm(total=total, initial=step, desc="stage 2", unit="step", disable=not progress)
    model.train()
    try:
        while step < total:
            epoch, within = divmod(step, per_epoch)
            batch = batch_plan(lengths, config.batch_size, config.seed, epoch)[within]
            states, mask = cache.batch(rows[batch], dev)
            for group in optimiser.param_groups:
                group["lr"] = group["base"] * _lr_factor(step, total, warmup)
            with autocast(dev, config.compute_dtype):
                logits = model(states, mask)
            loss = _loss(config, logits.float(), y_all[batch].to(dev))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(named.values()), config.grad_clip)
            optimiser.step()
            step += 1
            losses.append(round(float(loss.detach()), 5))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if step % config.checkpoint_every == 0 or step == total:
                _save_checkpoint(Path(ckpt_dir), step, model, optimiser, losses, spec)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        model.eval()
    outcome.steps, outcome.losses = step, losses
    outcome.seconds = round(time.perf_counter() - started, 1)
    return outcome


def config_json(config: TopConfig) -> dict[str, Any]:
    return asdict(config)
