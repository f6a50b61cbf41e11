"""Run a slice of a decoder LLM's blocks exactly as the model's own forward does.

Why: the teacher's stages 2-3 cache the per-token states entering block ``cut`` once, then run (and
train) only blocks ``cut..layer`` from that cache. Those blocks must see what they see inside the
full model: the rotary position embeddings the model computes once per forward
(``model.rotary_emb(hidden, position_ids)``, passed to every ``Qwen2DecoderLayer`` as
``position_embeddings``) and the causal mask built by ``transformers.masking_utils`` for the
model's attention implementation. This module is that one place; tests check it against
``model(..., output_hidden_states=True)``.

Batches are right-padded (:func:`darl_lite.distill.backbone.collate`), so positions are
``0..L-1`` for every row, as in the model's forward without ``position_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from darl_lite.errors import InputError


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a Llama-style decoder (Qwen2, Llama, Mistral) this code drives."""

    config: Any
    embed_tokens: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    rotary_emb: torch.nn.Module

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def of(cls, model: Any) -> DecoderParts:
        """Find the parts in a ``*ForCausalLM`` / ``*ForSequenceClassification`` or a bare base model."""
        base = getattr(model, "model", model)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        missing = [name for name in needed if not hasattr(base, name)]
        if missing:
            raise InputError(
                f"{type(model).__name__} is not a Llama-style decoder (no {', '.join(missing)}); "
                "stages 2-3 of the teacher recipe need a Qwen2/Llama-style LLM"
            )
        return cls(model.config, base.embed_tokens, base.layers, base.norm, base.rotary_emb)


def block_inputs(parts: DecoderParts, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments every decoder layer gets in the model's forward (mask per layer type)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cache_position = torch.arange(hidden.shape[1], device=hidden.device)
    position_ids = cache_position.unsqueeze(0)
    mask_kwargs = {
        "config": parts.config,
        "input_embeds": hidden,
        "attention_mask": attention_mask,
        "cache_position": cache_position,
        "past_key_values": None,
        "position_ids": position_ids,
    }
    masks = {"full_attention": create_causal_mask(**mask_kwargs)}
    if "sliding_attention" in getattr(parts.config, "layer_types", ()):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
    return {
        "masks": masks,
        "position_ids": position_ids,
        "cache_position": cache_position,
        "position_embeddings": parts.rotary_emb(hidden, position_ids),
    }


def run_blocks(
    parts: DecoderParts,
    layers: torch.nn.ModuleList | list[torch.nn.Module],
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    capture: tuple[int, ...] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Apply ``layers`` in order to ``hidden (B, L, H)``; return the output and captured states.

    ``capture`` names how many layers have run when a state is kept (0 = the input itself), so with
    ``layers = all blocks`` and input = embeddings, capture ``i`` is ``hidden_states[i]``.
    """
    kw = block_inputs(parts, hidden, attention_mask)
    captured: dict[int, torch.Tensor] = {}
    if 0 in capture:
        captured[0] = hidden
    for i, layer in enumerate(layers):
        hidden = layer(
            hidden,
            attention_mask=kw["masks"][getattr(layer, "attention_type", "full_attention")],
            position_ids=kw["position_ids"],
            past_key_values=None,
            use_cache=False,
            cache_position=kw["cache_position"],
            position_embeddings=kw["position_embeddings"],
        )
        if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
            hidden = hidden[0]
        if i + 1 in capture:
            captured[i + 1] = hidden
    return hidden, captured


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, H)`` state of each row's last real token (right padding)."""
    last = attention_mask.sum(-1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
