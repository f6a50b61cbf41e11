"""One optimiser loop for every training stage: AdamW setup, the step, checkpoints and resume.

:func:`darl_lite.distill.trainer.distill_student` and :func:`darl_lite.distill.stages.finetune`
both train through :class:`TrainLoop`, so they share the optimiser (AdamW, no decay on biases and
norms, linear warm-up and decay over the steps that run), the step (zero grad, backward, clip,
step, a non-finite loss stops the run) and the checkpoints.

Checkpoints: one directory per step, ``step-00000123/{state.pt, meta.json}``, written into a
temporary sibling and renamed into place (:mod:`darl_lite.atomic`), so a crash (or a full disk)
mid-write never leaves a checkpoint that looks complete. ``state.pt`` holds tensors and plain
containers only and is read back with ``torch.load(weights_only=True)``: nothing in it can run code.
``meta.json`` holds the position in the run, the numpy batch-order RNG state and a fingerprint of
the run's inputs; a checkpoint of another run is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from darl_lite.atomic import fsync_dir, fsync_file, replace_dir, staging_dir
from darl_lite.distill.backbone import TokenizedPairs
from darl_lite.errors import InputError
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

#: Parameter-name endings that get no weight decay (biases and normalisation weights).
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
#: Checkpoints kept (the newest ones); older ones are deleted after a write.
KEEP_CHECKPOINTS = 2
CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
_STATE_FILE = "state.pt"
_META_FILE = "meta.json"

#: Batches are formed inside shuffled windows of this many batches, sorted by length: enough to
#: group similar lengths (little padding) while keeping batches different from epoch to epoch.
_BUCKET_WINDOW = 50


def length_bucketed_batches(
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


def total_steps(n_pairs: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """Steps a run takes: ``epochs`` passes of ``ceil(n / batch_size)`` batches, capped by ``max_steps``."""
    total = epochs * math.ceil(n_pairs / batch_size)
    return total if max_steps is None else min(total, max_steps)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    grad_clip: float | None,
    *,
    step: int,
    what: str,
    hint: str = "lower the learning rate",
) -> float:
    """Backward, clip the global gradient norm to ``grad_clip``, step; the loss as a float.

    A NaN or infinite loss raises :class:`FloatingPointError` naming the step (``what`` names the
    stage, ``hint`` the fix) instead of training on.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} loss became {value} at step {step}; {hint}")
    return value


def run_fingerprint(
    settings: Mapping[str, Any], pairs: Sequence[Pair], arrays: Sequence[np.ndarray], model: torch.nn.Module
) -> str:
    """A hash of everything that decides a run: settings, pairs, grades, targets, parameter shapes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dict(settings), sort_keys=True).encode())
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0))
    digest.update(json.dumps([type(model).__name__, num_labels, len(pairs)]).encode())
    for pair in pairs:
        digest.update(json.dumps([pair.query, pair.item, pair.grade]).encode("utf-8", "surrogatepass"))
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}".encode())
    return digest.hexdigest()


class Checkpoints:
    """The checkpoint directory of one run (identified by ``fingerprint``), written every ``every`` steps."""

    def __init__(self, directory: str | os.PathLike[str], fingerprint: str, every: int = 100) -> None:
        if every < 1:
            raise InputError(f"checkpoint_every must be >= 1; got {every}")
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.every = every

    @classmethod
    def for_run(
        cls,
        directory: str | os.PathLike[str] | None,
        settings: Mapping[str, Any],
        pairs: Sequence[Pair],
        arrays: Sequence[np.ndarray],
        model: torch.nn.Module,
        every: int = 100,
    ) -> Checkpoints | None:
        """The checkpoints of the run these inputs define (:func:`run_fingerprint`); None without one."""
        if every < 1:
            raise InputError(f"checkpoint_every must be >= 1; got {every}")
        if directory is None:
            return None
        return cls(directory, run_fingerprint(settings, pairs, arrays, model), every=every)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (its ``meta.json`` is written last), or None.

        Removes the staging directories of writes a crash interrupted.
        """
        if not self.directory.is_dir():
            return None
        for stale in self.directory.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        found = [
            (int(match.group(1)), entry)
            for entry in self.directory.iterdir()
            if (match := _CHECKPOINT_NAME.match(entry.name)) and (entry / _META_FILE).is_file()
        ]
        return max(found)[1] if found else None

    def write(self, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write ``state`` (torch.save) and ``meta`` (JSON) as ``step-<meta['step']>``, atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step-{meta['step']:08d}"
        meta = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, **meta}
        with staging_dir(self.directory, prefix=f".tmp-{final.name}-") as staging:
            with open(staging / _STATE_FILE, "wb") as handle:
                torch.save(state, handle)
                fsync_file(handle)
            with open(staging / _META_FILE, "w", encoding="utf-8") as handle:
                json.dump(meta, handle, indent=2, sort_keys=True)
                fsync_file(handle)
            # the same step may be written again (a resumed run that crashed before moving on)
            replace_dir(staging, final)
            fsync_dir(self.directory)
        kept = sorted((e for e in self.directory.iterdir() if _CHECKPOINT_NAME.match(e.name)), reverse=True)
        for old in kept[KEEP_CHECKPOINTS:]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s written", final)
        return final

    def read(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(state, meta)`` of a checkpoint written for this run; another run's is refused."""
        try:
            meta = json.loads((path / _META_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"checkpoint {path}: unreadable {_META_FILE}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"checkpoint {path}: not a training checkpoint of format {CHECKPOINT_FORMAT}")
        if meta.get("fingerprint") != self.fingerprint:
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


class TrainLoop:
    """The optimiser, schedule, losses and checkpoints of one run over ``model``'s trainable parameters.

    Use: ``for batch in loop.batches(make_batches, rng): loop.step(loss_of(batch), len(batch))``.
    :meth:`batches` yields epoch after epoch of ``make_batches(rng)`` until ``total_steps`` steps
    ran; with ``checkpoints`` it first resumes from the newest checkpoint (weights, optimiser,
    schedule, torch and numpy RNG states, position in the epoch), so an interrupted run ends with
    the weights of one that never stopped.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
        total_steps: int,
        grad_clip: float | None,
        checkpoints: Checkpoints | None = None,
        what: str = "training",
        hint: str = "lower the learning rate",
        progress: bool = False,
    ) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        groups = [
            {"params": [p for n, p in named if not n.endswith(NO_DECAY)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0},
        ]
        self.model = model
        self.optimizer = torch.optim.AdamW(groups, lr=lr)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(warmup_ratio * total_steps), total_steps
        )
        self.total_steps = total_steps
        self.grad_clip = grad_clip
        self.checkpoints = checkpoints
        self.what, self.hint, self.progress = what, hint, progress
        self.losses: list[float] = []
        self.pairs_seen = 0
        self._epoch, self._done_in_epoch = 0, 0
        self._epoch_rng_state: dict[str, Any] = {}

    @property
    def finished(self) -> bool:
        return len(self.losses) >= self.total_steps

    def _resume(self) -> tuple[int, int, dict[str, Any] | None]:
        """Load the newest checkpoint; ``(epoch, batches done in it, its batch-order RNG state)``."""
        latest = self.checkpoints.latest() if self.checkpoints is not None else None
        if self.checkpoints is None or latest is None:
            return 0, 0, None
        state, meta = self.checkpoints.read(latest)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_torch_rng_state(state["torch_rng"])
        self.losses = [float(x) for x in state["losses"].tolist()]
        self.pairs_seen = int(meta["pairs_seen"])
        logger.info("resuming from %s: step %d of %d", latest, len(self.losses), self.total_steps)
        return int(meta["epoch"]), int(meta["batches_done_in_epoch"]), meta["epoch_rng_state"]

    def batches(
        self, make_batches: Callable[[np.random.Generator], list[list[int]]], rng: np.random.Generator
    ) -> Iterator[list[int]]:
        """Epoch after epoch of ``make_batches(rng)``, resumed where a checkpoint left off."""
        start_epoch, skip, resume_rng_state = self._resume()
        self._epoch = start_epoch
        if resume_rng_state is not None:
            rng.bit_generator.state = resume_rng_state
        bar = tqdm(
            total=self.total_steps,
            initial=len(self.losses),
            desc=self.what,
            unit="step",
            disable=not self.progress,
        )
        running: float | None = None
        try:
            while not self.finished:
                # The state that regenerates this epoch's batches: what a checkpoint must carry.
                self._epoch_rng_state = dict(rng.bit_generator.state)
                self._done_in_epoch = 0
                for batch in make_batches(rng):
                    if self.finished:
                        break
                    if self._epoch == start_epoch and self._done_in_epoch < skip:
                        self._done_in_epoch += 1
                        continue
                    yield batch
                    running = self.losses[-1] if running is None else 0.9 * running + 0.1 * self.losses[-1]
                    bar.set_postfix(loss=f"{running:.4f}")
                    bar.update(1)
                self._epoch += 1
        finally:
            bar.close()

    def train_on(
        self,
        data: TokenizedPairs,
        batch_size: int,
        rng: np.random.Generator,
        loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        """Run every step on length-bucketed batches of ``data``; the model ends in eval mode.

        ``loss_of(logits, index)`` is the batch's loss, ``index`` the batch's positions in ``data``
        (a CPU ``long`` tensor, to pick the matching targets).
        """
        self.model.train()
        try:
            for batch in self.batches(lambda r: length_bucketed_batches(data.lengths, batch_size, r), rng):
                index = torch.tensor(batch, dtype=torch.long)
                logits = self.model(**data.collate(batch)).logits
                self.step(loss_of(logits, index), len(batch))
        finally:
            self.model.eval()

    def step(self, loss: torch.Tensor, n_pairs: int) -> float:
        """One optimiser and schedule step on ``loss`` (the batch of ``n_pairs`` pairs); checkpoints."""
        value = optimizer_step(
            loss,
            self.optimizer,
            self.params,
            self.grad_clip,
            step=len(self.losses) + 1,
            what=self.what,
            hint=self.hint,
        )
        self.scheduler.step()
        self.losses.append(value)
        self.pairs_seen += n_pairs
        self._done_in_epoch += 1
        if self.checkpoints is not None and (
            len(self.losses) % self.checkpoints.every == 0 or len(self.losses) == self.total_steps
        ):
            self._checkpoint()
        return value

    def _checkpoint(self) -> None:
        assert self.checkpoints is not None
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": _torch_rng_state(),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
        }
        meta = {
            "step": len(self.losses),
            "total_steps": self.total_steps,
            "epoch": self._epoch,
            "batches_done_in_epoch": self._done_in_epoch,
            "epoch_rng_state": self._epoch_rng_state,
            "pairs_seen": self.pairs_seen,
        }
        self.checkpoints.write(state, meta)
