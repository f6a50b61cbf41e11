"""The teacher after stages 2-3: LLM blocks below the cut + tuned top blocks + head, one small file.

The file (``teacher_llm_top.npz``, plain arrays, no pickle) holds what the base LLM lacks: the cut,
the probe layer, the LoRA tensors of blocks ``cut..layer`` and their WiSE-FT mix ``α``, the head
(standardiser, weight, bias, temperature) and the dtypes the teacher file was produced with.
:class:`StagedTeacher` grades new pairs exactly that way: lower blocks in the compute dtype, the
cut state rounded to the cache's storage dtype, top blocks, head, temperature, softmax.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from darl_lite.distill.backbone import collate, pad_token_id_of, tokenize_pairs
from darl_lite.distill.cut_cache import autocast, lower_pass
from darl_lite.distill.decoder_blocks import DecoderParts
from darl_lite.distill.llm_features import TEACHER_TEMPLATE
from darl_lite.distill.llm_teacher import ProbeHead
from darl_lite.distill.top_tune import TopModel
from darl_lite.errors import InputError
from darl_lite.types import Pair

TOP_FORMAT = 1
TEACHER_NAME = "Qwen2.5-Coder-0.5B-Instruct + DaRL stages 1-3 (probe, LoRA top blocks, WiSE-FT)"
_HINT = "pass the teacher_llm_top.npz that `darl-lite distill teacher-stages` wrote"


def save_top(
    path: str | os.PathLike[str],
    model: TopModel,
    temperature: float,
    *,
    mix: float,
    compute_dtype: str,
    storage_dtype: str,
    max_length: int,
) -> Path:
    """Write ``model`` (LoRA tensors at mix ``mix``, head, temperature) atomically as ``.npz``."""
    arrays: dict[str, Any] = {
        "format": np.int64(TOP_FORMAT),
        "cut": np.int64(model.cut),
        "layer": np.int64(model.layer),
        "rank": np.int64(model.rank),
        "lora_alpha": np.float64(model.lora_alpha),
        "mix": np.float64(mix),
        "temperature": np.float64(temperature),
        "max_length": np.int64(max_length),
        "compute_dtype": np.str_(compute_dtype),
        "storage_dtype": np.str_(storage_dtype),
        "head.mean": model.get_buffer("mean").cpu().numpy(),
        "head.scale": model.get_buffer("scale").cpu().numpy(),
        "head.weight": model.head.weight.detach().cpu().numpy(),
        "head.bias": model.head.bias.detach().cpu().numpy(),
    }
    for name, module in model.lora_modules().items():
        arrays[f"lora.{name}.a"] = module.lora_a.detach().cpu().numpy()
        arrays[f"lora.{name}.b"] = module.lora_b.detach().cpu().numpy()
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, target)
    return target


def _read(path: str | os.PathLike[str]) -> dict[str, NDArray[Any]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise InputError(f"{path} is not a staged-teacher file: {exc}; {_HINT}") from exc
    if int(arrays.get("format", -1)) != TOP_FORMAT:
        raise InputError(f"{path} is not a staged-teacher file of format {TOP_FORMAT}; {_HINT}")
    return arrays


def load_top(path: str | os.PathLike[str], parts: DecoderParts) -> tuple[TopModel, dict[str, Any]]:
    """A :class:`TopModel` on ``parts`` with the file's tensors, and the file's settings."""
    a = _read(path)
    head = ProbeHead(
        int(a["layer"]),
        a["head.mean"],
        a["head.scale"],
        a["head.weight"],
        a["head.bias"],
        float(a["temperature"]),
    )
    model = TopModel(parts, int(a["cut"]), int(a["layer"]), head, int(a["rank"]), float(a["lora_alpha"]))
    modules = model.lora_modules()
    names = {k[len("lora.") : -2] for k in a if k.startswith("lora.")}
    if names != set(modules):
        raise InputError(
            f"{path} has LoRA tensors for {len(names)} layers; this LLM's top has {len(modules)}"
        )
    with torch.no_grad():
        for name, module in modules.items():
            module.lora_a.copy_(torch.from_numpy(a[f"lora.{name}.a"]))
            module.lora_b.copy_(torch.from_numpy(a[f"lora.{name}.b"]))
            module.mix = float(a["mix"])
    settings = {
        k: (str(a[k]) if a[k].dtype.kind == "U" else a[k].item())
        for k in ("cut", "layer", "mix", "temperature", "max_length", "compute_dtype", "storage_dtype")
    }
    return model.eval(), settings


class StagedTeacher:
    """The tuned teacher of stages 1-3. Implements :class:`darl_lite.teacher.Teacher` (``kind = "llm"``)."""

    kind = "llm"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        top: TopModel,
        settings: dict[str, Any],
        *,
        name: str = TEACHER_NAME,
        template: str = TEACHER_TEMPLATE,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model, self.tokenizer, self.top, self.settings = model, tokenizer, top, settings
        self.name, self.template, self.batch_size = name, template, batch_size
        self.device = torch.device(device)
        self.parts = DecoderParts.of(model)
        self._pad = pad_token_id_of(model, tokenizer)

    @classmethod
    def from_files(
        cls, model_dir: str | os.PathLike[str], top_path: str | os.PathLike[str], **kwargs: Any
    ) -> StagedTeacher:
        from darl_lite.distill.teacher_tune import load_llm

        model, tokenizer = load_llm(model_dir)
        top, settings = load_top(top_path, DecoderParts.of(model))
        return cls(model, tokenizer, top, settings, **kwargs)

    def predict_proba(self, pairs: Sequence[Pair]) -> NDArray[np.float32]:
        """Grade probabilities ``(len(pairs), C)`` in input order."""
        n_grades = self.top.head.out_features
        if not pairs:
            return np.zeros((0, n_grades), np.float32)
        s = self.settings
        encoded = tokenize_pairs(
            self.tokenizer, pairs, int(s["max_length"]), token_type_ids=False, template=self.template
        )
        order = sorted(range(len(pairs)), key=lambda i: len(encoded[i]["input_ids"]))
        logits = np.empty((len(pairs), n_grades), np.float32)
        store = torch.float16 if s["storage_dtype"] == "float16" else torch.float32
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                inputs = collate(
                    [{"input_ids": encoded[i]["input_ids"]} for i in idx], self._pad, self.device
                )
                mask = inputs["attention_mask"]
                with autocast(self.device, s["compute_dtype"]):
                    states, _ = lower_pass(
                        self.parts, inputs["input_ids"], mask, int(s["cut"]), int(s["cut"])
                    )
                states = states.float().to(store).float()
                with autocast(self.device, s["compute_dtype"]):
                    logits[idx] = self.top(states, mask).float().cpu().numpy()
        return softmax(logits / float(s["temperature"]))


def softmax(z: NDArray[np.floating]) -> NDArray[np.float32]:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
