"""Train a student on teacher probabilities (and human grades where known), predict, and save it."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from darl_lite.distill.backbone import (
    DEFAULT_MAX_LENGTH,
    accepts_token_type_ids,
    collate,
    model_device,
    pad_token_id_of,
    tokenize_pairs,
)
from darl_lite.distill.losses import distillation_loss
from darl_lite.errors import InputError
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

#: Batches are formed inside shuffled windows of this many batches, sorted by length: enough to
#: group similar lengths (little padding) while keeping batches different from epoch to epoch.
_BUCKET_WINDOW = 50
#: Tolerance on teacher rows summing to 1 (float32 files written by other tools round).
_ROW_SUM_ATOL = 1e-3
#: Checkpoints kept in ``checkpoint_dir`` (the newest ones); older ones are deleted after a write.
_KEEP_CHECKPOINTS = 2
_CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
_STATE_FILE = "state.pt"
_META_FILE = "meta.json"


@dataclass(frozen=True, slots=True)
class DistillConfig:
    """Hyper-parameters of one distillation run; invalid values raise :class:`InputError` at once.

    ``max_steps`` (if set) stops the run early, before ``epochs`` are done; the learning-rate
    schedule (linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0) is laid over
    the steps that will actually run. ``grad_clip`` is the max global gradient norm (``None``: off).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 2.0
    alpha: float = 0.5
    max_length: int = DEFAULT_MAX_LENGTH
    seed: int = 0
    max_steps: int | None = None
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.epochs >= 1, f"epochs must be >= 1; got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0; got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must lie in [0, 1); got {self.warmup_ratio}"),
            (self.temperature > 0, f"temperature must be > 0; got {self.temperature}"),
            (0 <= self.alpha <= 1, f"alpha must lie in [0, 1]; got {self.alpha}"),
            (self.max_length >= 8, f"max_length must be >= 8 tokens; got {self.max_length}"),
            (
                self.max_steps is None or self.max_steps >= 1,
                f"max_steps must be None or >= 1; got {self.max_steps}",
            ),
            (
                self.grad_clip is None or self.grad_clip > 0,
                f"grad_clip must be None or > 0; got {self.grad_clip}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"DistillConfig: {message}")


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a run did: the loss of every optimiser step, in order, and the wall time it took."""

    losses: tuple[float, ...]
    seconds: float
    steps: int
    pairs_seen: int

    @property
    def pairs_per_second(self) -> float:
        """Training throughput (tokenisation included), for sizing runs."""
        return self.pairs_seen / self.seconds if self.seconds > 0 else math.inf


def _validate_inputs(pairs: Sequence[Pair], teacher_probs: np.ndarray, n_labels: int) -> NDArray[np.float32]:
    if len(pairs) == 0:
        raise InputError(
            "distill_student got no pairs; pass at least one pair with its teacher probabilities"
        )
    probs = np.asarray(teacher_probs)
    if probs.ndim != 2 or probs.shape != (len(pairs), n_labels):
        raise InputError(
            f"teacher_probs must have shape (len(pairs), n_labels) = ({len(pairs)}, {n_labels}) to match "
            f"the pairs and the student's head; got {probs.shape}"
        )
    if not np.issubdtype(probs.dtype, np.floating) or not np.all(np.isfinite(probs)):
        raise InputError("teacher_probs must be finite floating-point probabilities")
    if probs.min() < 0:
        raise InputError(
            f"teacher_probs must be >= 0; row {int(np.argmin(probs.min(axis=1)))} has a negative"
        )
    sums = probs.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > _ROW_SUM_ATOL)
    if off.size:
        raise InputError(
            f"each teacher_probs row must sum to 1 (±{_ROW_SUM_ATOL}); {off.size} rows do not, "
            f"e.g. row {int(off[0])} sums to {float(sums[off[0]]):.6f}. Pass probabilities, not logits."
        )
    for i, pair in enumerate(pairs):
        if pair.grade is not None and not 0 <= pair.grade < n_labels:
            raise InputError(f"pairs[{i}].grade must be None or in [0, {n_labels}); got {pair.grade}")
    return probs.astype(np.float32, copy=False)


def _length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """One epoch of batches: shuffle, sort by length within windows, cut, shuffle the batches.

    Sorting gathers pairs of similar length so a batch pads little; shuffling before and after keeps
    the order (and the batches themselves) random and seeded.
    """
    order = rng.permutation(len(lengths))
    window = batch_size * _BUCKET_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: lengths[i])
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


# --------------------------------------------------------------------------------------------------
# Checkpoints: one directory per step, ``step-00000123/{state.pt, meta.json}``, written into a
# temporary sibling and renamed into place, so a crash (or a full disk) mid-write never leaves a
# checkpoint that looks complete. ``state.pt`` holds tensors and plain containers only and is read
# back with ``torch.load(weights_only=True)``: nothing in it can run code. ``meta.json`` holds the
# position in the run, the numpy batch-order RNG state and a fingerprint of the run's inputs.


def _run_fingerprint(
    config: DistillConfig, pairs: Sequence[Pair], probs: NDArray[np.float32], model: PreTrainedModel
) -> str:
    """A hash of everything that decides the run: config, pairs, grades, teacher targets, shapes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(json.dumps([type(model).__name__, int(model.config.num_labels), len(pairs)]).encode())
    for pair in pairs:
        digest.update(json.dumps([pair.query, pair.item, pair.grade]).encode("utf-8", "surrogatepass"))
    digest.update(np.ascontiguousarray(probs, dtype=np.float32).tobytes())
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}".encode())
    return digest.hexdigest()


def _latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (its ``meta.json`` is written last), or None."""
    if not directory.is_dir():
        return None
    found = [
        (int(match.group(1)), entry)
        for entry in directory.iterdir()
        if (match := _CHECKPOINT_NAME.match(entry.name)) and (entry / _META_FILE).is_file()
    ]
    return max(found)[1] if found else None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_checkpoint(directory: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` (torch.save) and ``meta`` (JSON) as checkpoint ``step-<meta['step']>``, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{meta['step']:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=directory))
    try:
        with open(staging / _STATE_FILE, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        with open(staging / _META_FILE, "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # the same step written again (a resumed run that crashed before moving on)
            shutil.rmtree(final)
        staging.rename(final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    kept = sorted(
        (entry for entry in directory.iterdir() if _CHECKPOINT_NAME.match(entry.name)), reverse=True
    )
    for old in kept[_KEEP_CHECKPOINTS:]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s written", final)
    return final


def _read_checkpoint(path: Path, fingerprint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` of a checkpoint written for the run with this ``fingerprint``."""
    try:
        meta = json.loads((path / _META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"checkpoint {path}: unreadable {_META_FILE}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != _CHECKPOINT_FORMAT:
        raise InputError(
            f"checkpoint {path}: not a distill_student checkpoint of format {_CHECKPOINT_FORMAT}"
        )
    if meta.get("fingerprint") != fingerprint:
        raise InputError(
            f"checkpoint {path} belongs to another run (different config, pairs, teacher targets or "
            "model); pass an empty checkpoint_dir for this run, or delete that directory to start over"
        )
    try:
        state = torch.load(path / _STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or corrupt: torch raises several types
        raise InputError(
            f"checkpoint {path}: {_STATE_FILE} is unreadable ({type(exc).__name__}: {exc}); "
            "delete this checkpoint directory to resume from the one before it"
        ) from exc
    return state, meta


def _torch_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_torch_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def distill_student(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    teacher_probs: np.ndarray,
    config: DistillConfig | None = None,
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
) -> TrainResult:
    """Train ``model`` in place on ``(pairs, teacher_probs)`` with :func:`distillation_loss`.

    Pairs are tokenised once as (query, item) sentence pairs, truncated to ``config.max_length``, and
    batched by length. Human grades come from ``Pair.grade`` (``None`` counts as ungraded). The
    optimiser is AdamW (no decay on biases and LayerNorm weights) with linear warm-up and decay. The
    run seeds torch and the batch order with ``config.seed``; it does not change torch's thread count
    (that is the caller's choice). The model is left in eval mode.

    With ``checkpoint_dir`` the run writes a checkpoint every ``checkpoint_every`` steps and at the
    end: model, optimiser and scheduler state, the step, the losses so far and the torch and numpy
    RNG states, atomically (temporary directory, then rename; the newest two are kept). Called again
    with the same arguments and directory, it resumes from the newest checkpoint and ends with the
    same weights as a run that was never interrupted (bit for bit on the same machine and thread
    count); a finished run's checkpoint just restores the final weights. A checkpoint of a different
    run (config, pairs, targets or model shape) is refused with :class:`InputError`. Checkpoints are
    read with ``torch.load(weights_only=True)``, which never unpickles code. ``TrainResult.seconds``
    covers this call only; ``losses``, ``steps`` and ``pairs_seen`` cover the whole run.
    """
    config = config or DistillConfig()
    if checkpoint_every < 1:
        raise InputError(f"checkpoint_every must be >= 1; got {checkpoint_every}")
    n_labels = int(model.config.num_labels)
    probs = _validate_inputs(pairs, teacher_probs, n_labels)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = model_device(model)
    pad_id = pad_token_id_of(model, tokenizer)

    started = time.perf_counter()
    features = tokenize_pairs(
        tokenizer, pairs, config.max_length, token_type_ids=accepts_token_type_ids(model)
    )
    lengths = [len(f["input_ids"]) for f in features]
    targets = torch.from_numpy(probs)
    grades = torch.tensor([-1 if p.grade is None else p.grade for p in pairs], dtype=torch.long)

    batches_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = config.epochs * batches_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )

    losses: list[float] = []
    pairs_seen = 0
    start_epoch, skip_batches = 0, 0
    resume_rng_state: dict[str, Any] | None = None
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = ""
    if ckpt_dir is not None:
        fingerprint = _run_fingerprint(config, pairs, probs, model)
        for stale in ckpt_dir.glob(".tmp-step-*") if ckpt_dir.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)  # a write a crash interrupted
        latest = _latest_checkpoint(ckpt_dir)
        if latest is not None:
            state, meta = _read_checkpoint(latest, fingerprint)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_torch_rng_state(state["torch_rng"])
            losses = [float(x) for x in state["losses"].tolist()]
            pairs_seen = int(meta["pairs_seen"])
            start_epoch, skip_batches = int(meta["epoch"]), int(meta["batches_done_in_epoch"])
            resume_rng_state = meta["epoch_rng_state"]
            logger.info("resuming from %s: step %d of %d", latest, len(losses), total_steps)

    def checkpoint(epoch: int, done_in_epoch: int, epoch_rng_state: dict[str, Any]) -> None:
        assert ckpt_dir is not None
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": _torch_rng_state(),
            "losses": torch.tensor(losses, dtype=torch.float64),
        }
        meta = {
            "format": _CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "step": len(losses),
            "total_steps": total_steps,
            "epoch": epoch,
            "batches_done_in_epoch": done_in_epoch,
            "epoch_rng_state": epoch_rng_state,
            "pairs_seen": pairs_seen,
        }
        _write_checkpoint(ckpt_dir, state, meta)

    model.train()
    running: float | None = None
    bar = tqdm(total=total_steps, initial=len(losses), desc="distill", unit="step", disable=not progress)
    try:
        for epoch in range(config.epochs):
            if len(losses) >= total_steps:
                break
            if epoch < start_epoch:
                continue  # done before the interruption; its batch order is inside the saved RNG state
            if epoch == start_epoch and resume_rng_state is not None:
                rng.bit_generator.state = resume_rng_state
            # The state that regenerates this epoch's batches: what a checkpoint must carry.
            epoch_rng_state = dict(rng.bit_generator.state)
            done_in_epoch = 0
            for batch in _length_bucketed_batches(lengths, config.batch_size, rng):
                if len(losses) >= total_steps:
                    break
                if epoch == start_epoch and done_in_epoch < skip_batches:
                    done_in_epoch += 1
                    continue
                index = torch.tensor(batch, dtype=torch.long)
                inputs = collate([features[i] for i in batch], pad_id, device)
                logits = model(**inputs).logits
                loss = distillation_loss(
                    logits,
                    targets[index].to(device),
                    grades[index].to(device),
                    temperature=config.temperature,
                    alpha=config.alpha,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"distillation loss became {value} at step {len(losses) + 1}; lower lr "
                        f"(now {config.lr}) or check the teacher probabilities"
                    )
                losses.append(value)
                pairs_seen += len(batch)
                done_in_epoch += 1
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.set_postfix(loss=f"{running:.4f}")
                bar.update(1)
                if ckpt_dir is not None and (
                    len(losses) % checkpoint_every == 0 or len(losses) == total_steps
                ):
                    checkpoint(epoch, done_in_epoch, epoch_rng_state)
    finally:
        bar.close()
        model.eval()
    seconds = time.perf_counter() - started
    logger.info(
        "distilled %d steps (%d pairs) in %.1f s: loss %.4f -> %.4f",
        len(losses),
        pairs_seen,
        seconds,
        losses[0],
        losses[-1],
    )
    return TrainResult(losses=tuple(losses), seconds=seconds, steps=len(losses), pairs_seen=pairs_seen)


def predict_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    batch_size: int = 64,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> NDArray[np.float32]:
    """Student logits ``(len(pairs), n_labels)`` in input order; ``(0, n_labels)`` for no pairs.

    Runs in eval mode under ``no_grad`` in length-sorted batches (for speed), then restores input
    order and the model's previous train/eval mode.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1; got {batch_size}")
    n_labels = int(model.config.num_labels)
    out = np.empty((len(pairs), n_labels), dtype=np.float32)
    if not pairs:
        return out
    features = tokenize_pairs(tokenizer, pairs, max_length, token_type_ids=accepts_token_type_ids(model))
    order = sorted(range(len(pairs)), key=lambda i: len(features[i]["input_ids"]))
    device = model_device(model)
    pad_id = pad_token_id_of(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                logits = model(**collate([features[i] for i in idx], pad_id, device)).logits
                out[idx] = logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save model (safetensors) and tokenizer to ``out_dir`` so :func:`load_student` can reload them."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    logger.info("saved student to %s", path)
    return path
