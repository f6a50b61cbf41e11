"""One text per pair: the tuned teacher's template, rendered by a client and inverted by a server.

A classification endpoint (vLLM's ``/classify``) grades texts, not pairs, so the client renders each
``(query, item)`` with the template the teacher was tuned with, and darl-lite's teacher server,
whose teachers grade pairs, splits the text back. The split is exact in the sense that matters: any
split the server picks re-renders to the very text it received (``render(*split(text)) == text``),
so the teacher reads the same tokens as in process, even when a query itself contains the separator.

:data:`TEACHER_TEMPLATE` is the template of the shipped teacher (``darl_lite.distill.llm_features``
holds the training side's copy; a test keeps the two equal, the runtime never imports distill).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from darl_lite.errors import InputError

#: The shipped teacher's grading text (``darl_lite.distill.llm_features.TEACHER_TEMPLATE``).
TEACHER_TEMPLATE = "Query: {query}\nEntity: {item}\nRelevance:"


@dataclass(frozen=True)
class PairText:
    """A ``str.format`` template with ``{query}`` and ``{item}`` once each, separated by text."""

    template: str = TEACHER_TEMPLATE
    _parts: tuple[str, str, str, str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parts", _parts(self.template))  # frozen: set once, here

    def render(self, query: str, item: str) -> str:
        """The text the teacher grades for one pair."""
        return self.template.format(query=query, item=item)

    def split(self, text: str) -> tuple[str, str]:
        """``(query, item)`` whose rendering is ``text``; ``ValueError`` when ``text`` cannot be one."""
        prefix, first, sep, _second, suffix = self._parts
        if not (text.startswith(prefix) and text.endswith(suffix) and len(text) >= len(prefix) + len(suffix)):
            raise ValueError(f"does not follow the template {self.template!r}")
        middle = text[len(prefix) : len(text) - len(suffix)]
        at = middle.find(sep)
        if at < 0:
            raise ValueError(f"does not follow the template {self.template!r} (no {sep!r} in it)")
        a, b = middle[:at], middle[at + len(sep) :]
        return (a, b) if first == "query" else (b, a)


def _parts(template: object) -> tuple[str, str, str, str, str]:
    """``(prefix, first field, separator, second field, suffix)`` of a two-field template."""
    if not isinstance(template, str):
        raise InputError(f"template must be a string; got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"template {template!r} is not a str.format template: {exc}") from exc
    # Formatter.parse yields (literal, field) chunks, escaped braces as chunks of their own: gather
    # the literal text before, between and after the two fields.
    literals, fields = [""], []
    for literal, name, spec, conv in parsed:
        literals[-1] += literal
        if name is not None:
            fields.append((name, spec, conv))
            literals.append("")
    names = [name for name, _, _ in fields]
    if sorted(names) != ["item", "query"] or any(spec or conv for _, spec, conv in fields):
        raise InputError(
            f"template must hold the fields {{query}} and {{item}} once each, without format specs "
            f"(double literal braces); got {template!r}"
        )
    prefix, sep, suffix = literals
    if not sep:
        raise InputError(f"template must separate {{query}} and {{item}} with some text; got {template!r}")
    return prefix, names[0], sep, names[1], suffix


__all__ = ["TEACHER_TEMPLATE", "PairText"]
