"""A routing budget over a sliding time window, shared by every call of a scorer.

The per-call cap of :class:`~darl_lite.routing.RoutingPolicy` bounds one request; a node serving
many small requests also needs the LLM's share bounded over time, or a burst of one-item requests
(each allowed its one pair) would send everything. :class:`RouteBudget` counts the pairs seen and
the pairs routed in the last ``window_s`` seconds and lets a call route at most
``floor(max_fraction * (seen_in_window + n)) - routed_in_window`` of its ``n`` pairs: no call ever
routes a pair that would lift the window's routed share, counting that call, above ``max_fraction``.
Pairs leave the window together with the pairs routed at the same time; when older, unrouted pairs
leave first, the share of what remains can sit above the fraction, and then calls route nothing
until it is back under.

Whole shifted lists (:meth:`RouteBudget.acquire_list`) come first: they have the larger expected
gain per pair, so per-pair routing may spend only what the lists asked for in the window leaves
of the allowance. Lists that asked and were refused still count as asked, so per-pair routing
yields to them from then on, and the allowance builds up for the next list instead of being spent
pair by pair. Without list demand, per-pair routing has the whole allowance, as before.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from darl_lite.errors import InputError


class RouteBudget:
    """Caps the share of pairs routed to the LLM over the last ``window_s`` seconds. Thread-safe.

    ``clock`` returns seconds (monotonic); inject one to make tests deterministic.
    """

    def __init__(
        self,
        max_fraction: float,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise InputError(f"max_fraction must lie in [0, 1], got {max_fraction}")
        if not window_s > 0.0:
            raise InputError(f"window_s must be > 0 seconds, got {window_s}")
        self.max_fraction = float(max_fraction)
        self.window_s = float(window_s)
        self._clock = clock
        self._lock = threading.Lock()
        # (time, seen, routed, pairs wanted by lists, pairs routed one by one)
        self._events: deque[tuple[float, int, int, int, int]] = deque()
        self._seen = 0
        self._routed = 0
        self._list_wanted = 0
        self._pair_routed = 0

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            _, seen, routed, list_wanted, pair_routed = self._events.popleft()
            self._seen -= seen
            self._routed -= routed
            self._list_wanted -= list_wanted
            self._pair_routed -= pair_routed

    def _record(self, now: float, n: int, granted: int, list_wanted: int, pair_routed: int) -> None:
        if n:
            self._events.append((now, n, granted, list_wanted, pair_routed))
            self._seen += n
            self._routed += granted
            self._list_wanted += list_wanted
            self._pair_routed += pair_routed

    def acquire(self, n: int, wanted: int, *, all_or_nothing: bool = False, reserve: int = 0) -> int:
        """Record a call of ``n`` pairs that wants to route ``wanted`` one by one; return how many
        it may route.

        The grant stays within the window's allowance less ``reserve`` pairs (kept unspent for
        lists that may follow), and within what the lists asked for in the window leaves of
        it (see the module docstring). ``all_or_nothing`` grants ``wanted`` or 0. The answer and
        the bookkeeping happen under one lock, so concurrent calls never overspend.
        """
        _check_counts(n, wanted)
        if reserve < 0:
            raise InputError(f"reserve must be >= 0 pairs, got {reserve}")
        with self._lock:
            now = self._clock()
            self._expire(now)
            cap = self._cap(n)
            allowed = min(cap - self._routed - reserve, cap - self._list_wanted - self._pair_routed)
            granted = max(0, min(wanted, allowed))
            if all_or_nothing and granted < wanted:
                granted = 0
            self._record(now, n, granted, 0, granted)
            return granted

    def acquire_list(self, n: int) -> bool:
        """Record a list (or its routed head) of ``n`` pairs that wants the LLM; True if all of it
        may go (a ranked list goes to one model or stays with the other). Asked-for lists take
        precedence over per-pair routing in the window, granted or not."""
        _check_counts(n, n)
        with self._lock:
            now = self._clock()
            self._expire(now)
            granted = n if n <= self._cap(n) - self._routed else 0
            self._record(now, n, granted, n, 0)
            return granted == n

    def pair_share(self, reserve: int = 0) -> float | None:
        """The share of the pairs that lists do not take which per-pair routing can route in
        steady state, from the window: ``(max_fraction · seen − list demand − reserve) / (seen − list
        demand)``, clipped to [0, 1]; None while the window is empty (nothing to go by).

        Routing that asks for about this share gets its grants for its most urgent pairs; asking
        for more lets whichever calls come first spend the allowance."""
        with self._lock:
            self._expire(self._clock())
            rest = self._seen - self._list_wanted
            if self._seen <= 0 or rest <= 0:
                return None if self._seen <= 0 else 0.0
            share = (self.max_fraction * self._seen - self._list_wanted - reserve) / rest
            return min(1.0, max(0.0, share))

    def _cap(self, n: int) -> int:
        return math.floor(self.max_fraction * (self._seen + n) + 1e-9)

    def usage(self) -> tuple[int, int]:
        """``(seen, routed)`` pairs within the current window."""
        with self._lock:
            self._expire(self._clock())
            return self._seen, self._routed

    def __repr__(self) -> str:
        return f"RouteBudget(max_fraction={self.max_fraction}, window_s={self.window_s})"


def _check_counts(n: int, wanted: int) -> None:
    if n < 0 or not 0 <= wanted <= n:
        raise InputError(f"need 0 <= wanted <= n, got wanted={wanted}, n={n}")


__all__ = ["RouteBudget"]
