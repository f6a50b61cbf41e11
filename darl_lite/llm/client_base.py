"""What every HTTP grade client shares: its transport, the settings read through it, health and close.

:class:`~darl_lite.llm.openai_client.OpenAIGradeClient` and
:class:`~darl_lite.llm.classify_client.ClassifyGradeClient` differ only in the request bodies they
build and the answers they parse; the endpoint set-up, the settings callers and tests read, the
``health()`` report, ``close()`` and ``with`` live here once so the two cannot drift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from darl_lite.llm.breaker import CircuitBreaker
from darl_lite.llm.transport import HTTPTransport
from darl_lite.llm.validate import server_root

if TYPE_CHECKING:
    import httpx

C = TypeVar("C", bound="TransportClient")


def response_json(response: httpx.Response) -> Any:
    """The decoded JSON of an answer, or ``ValueError`` (an unusable answer) quoting its start."""
    try:
        return response.json()
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"body is not JSON ({exc}): {response.text[:120]!r}") from exc


class TransportClient:
    """Base of the HTTP grade clients: one :class:`HTTPTransport` to ``{server root}{path}``.

    Subclasses set :attr:`protocol` (reported by :meth:`health`) and ``model``, and call
    :meth:`_open_transport` from ``__init__``.
    """

    protocol: ClassVar[str] = ""
    model: str | None
    transport: HTTPTransport
    base_url: str
    endpoint: str

    def _open_transport(self, base_url: str, path: str, unit: str, **settings: Any) -> None:
        """Set ``transport``, ``base_url`` (the server root) and ``endpoint``; ``settings`` go to it."""
        root = server_root(base_url)
        self.transport = HTTPTransport(f"{root}{path}", unit=unit, **settings)
        self.base_url = root
        self.endpoint = self.transport.endpoint

    # Settings live on the transport; these read them where callers and tests look.
    @property
    def timeout_s(self) -> float:
        return self.transport.timeout_s

    @property
    def call_timeout_s(self) -> float:
        return self.transport.call_timeout_s

    @property
    def max_concurrency(self) -> int:
        return self.transport.max_concurrency

    @property
    def retries(self) -> int:
        return self.transport.retries

    @property
    def breaker(self) -> CircuitBreaker:
        return self.transport.breaker

    def health(self) -> dict[str, Any]:
        """Breaker state, counts and latencies (:meth:`HTTPTransport.health`), plus protocol and model."""
        return {"protocol": self.protocol, "model": self.model, **self.transport.health()}

    def close(self) -> None:
        """Stop pending work, wait for in-flight requests (at most ``timeout_s``), close connections."""
        self.transport.close()

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _repr_settings(self) -> str:
        """The transport settings every client's ``repr`` shows (the api key only as ``<set>``)."""
        t = self.transport
        return (
            f"timeout_s={t.timeout_s}, max_concurrency={t.max_concurrency}, retries={t.retries}, "
            f"api_key={'<set>' if t.has_api_key else None}, breaker={t.breaker!r}"
        )


__all__ = ["TransportClient", "response_json"]
