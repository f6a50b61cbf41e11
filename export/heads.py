"""The classification head of a Hugging Face model, what it reads, and one vector per pair from it.

The one home of head lookup and pooling for the export (the graph's ``pooled`` output, which the
OOD detector reads) and the training stages (the linear probe's cached features): both must read
the same vector, or the probe would train on features the exported graph does not give. Needs only
torch, imported inside each function, so importing this module is cheap and pulls no training code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from darl_lite.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["HEAD_ATTRIBUTES", "capture_head_input", "head_of", "pool_head_input"]

#: Head attributes looked up, in order: encoders call it ``classifier``, decoder LLMs ``score``.
HEAD_ATTRIBUTES: tuple[str, ...] = ("classifier", "score")


def head_of(model: Any) -> tuple[str, torch.nn.Module]:
    """``(attribute, module)`` of the classification head: ``classifier`` (encoders) or ``score``."""
    import torch

    for name in HEAD_ATTRIBUTES:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise InputError(
        f"{type(model).__name__} has no classification head attribute among {list(HEAD_ATTRIBUTES)}; "
        "pass a Hugging Face AutoModelForSequenceClassification model (load it with "
        "AutoModelForSequenceClassification.from_pretrained(path, num_labels=3))"
    )


@contextlib.contextmanager
def capture_head_input(head: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of ``head`` (as ``captured["hidden"]``) while the block runs."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured["hidden"] = args[0]

    handle = head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def pool_head_input(
    hidden: torch.Tensor, input_ids: torch.Tensor, head_name: str, pad_token_id: int | None
) -> torch.Tensor:
    """One vector per pair from what the head read: 2-D as is; a decoder's 3-D at the last non-pad token.

    A 2-D head input (BERT pooler output, DistilBERT pre-classifier…) is already one vector per
    pair. A 3-D one is a decoder's ``score`` head, which transformers applies to every position and
    reads at the last non-padding token; the same position is picked by the same rule
    (``argmax(arange(L) * (input_ids != pad))``, as in ``Qwen2ForSequenceClassification``), so the
    head applied to the pooled vector gives exactly the model's logits. Positions are int32 (the
    ONNX ArgMax kernels of onnxruntime take no int64) and follow the tensors' device.
    """
    import torch

    if hidden.dim() == 2:
        return hidden
    if hidden.dim() != 3 or head_name != "score":
        raise InputError(
            f"the {head_name!r} head reads a {hidden.dim()}-D tensor and pools inside itself; supported "
            "are heads that read one vector per pair (BERT-like) and decoder 'score' heads"
        )
    if pad_token_id is None:
        last = torch.full(hidden.shape[:1], hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
    else:
        non_pad = (input_ids != pad_token_id).to(torch.int32)
        positions = torch.arange(input_ids.shape[-1], dtype=torch.int32, device=input_ids.device)
        last = (positions * non_pad).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
