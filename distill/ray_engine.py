"""The Ray Data engine both cluster jobs run on: a session, and ``map_batches`` over an actor pool.

    with ray_session(options.address):
        for batch in run_actor_pool(rows, GradeActor, (spec, 1), options):
            ...  # dict of numpy columns, in whatever order the actors finish

One home for what :mod:`darl_lite.distill.ray_label` (teacher grades) and
:mod:`darl_lite.distill.ray_dasa` (DASA pool scores) share: the ``ray`` import and its error,
connecting to (or starting) a cluster, and a callable class run over a fixed-size actor pool, one
model load per actor. Ray's ``concurrency=`` argument of ``map_batches`` is deprecated (Ray 2.51+);
the pool is ``compute=ray.data.ActorPoolStrategy(size=n)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from darl_lite.errors import InputError, MissingExtraError

logger = logging.getLogger(__name__)

#: Actor batches per block: small blocks keep every actor busy and bound what a lost task redoes.
BATCHES_PER_BLOCK = 4
#: Blocks built per ``from_items`` call (the driver holds one group of rows as dicts at a time).
BLOCKS_PER_GROUP = 64


def import_ray() -> Any:
    """``ray`` with ``ray.data`` loaded, or :class:`MissingExtraError` naming the ``ray`` extra."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise MissingExtraError.for_module("ray", "ray") from exc
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray job runs.

    ``address``: ``None`` lets ``ray.init()`` decide (``RAY_ADDRESS``, then the cluster last started
    on this machine, else a new local instance); ``"auto"`` requires an existing cluster; ``"local"``
    starts a new one; ``"HOST:PORT"`` or ``"ray://HOST:10001"`` connects there. ``actors``: size of
    the fixed actor pool (one model load each). ``batch_size``: rows per actor call.
    ``cpus_per_actor``: CPUs Ray reserves per actor, also its torch thread count.
    """

    address: str | None = None
    actors: int = 1
    batch_size: int = 256
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        for field in ("actors", "batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"RayOptions.{field} must be an integer >= 1; got {value!r}")
        cpus = self.cpus_per_actor
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not cpus > 0:
            raise InputError(f"RayOptions.cpus_per_actor must be a number > 0; got {cpus!r}")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise InputError(
                f"RayOptions.address must be None, 'auto', 'local', 'HOST:PORT' or 'ray://HOST:PORT'; "
                f"got {self.address!r}"
            )

    @property
    def threads(self) -> int:
        """Intra-op threads an actor uses: its CPU reservation, at least one."""
        return max(1, int(self.cpus_per_actor))


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: reuses a session already open in this process, else opens one and closes it."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {}
    if not (address or "").startswith("ray://"):
        kwargs["include_dashboard"] = False  # no HTTP server on a node we start
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise InputError(
            f"no Ray cluster at {address!r} ({exc}); start one with `ray start --head`, pass its "
            "address (HOST:6379 or ray://HOST:10001), or pass --ray without an address to run locally"
        ) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _dataset(ray: Any, rows: Iterable[Mapping[str, Any]], rows_per_block: int) -> Any:
    """The rows as a Ray dataset of ``rows_per_block``-row blocks, or None when there are none.

    Built from this process with ``from_items`` (no remote task to plan it), a group of blocks at a
    time: each group goes to the object store (which spills to disk) before the next is read, so the
    driver never holds every row as a dict at once.
    """
    parts: list[Any] = []
    group: list[Mapping[str, Any]] = []
    for row in rows:
        group.append(row)
        if len(group) == rows_per_block * BLOCKS_PER_GROUP:
            parts.append(ray.data.from_items(group, override_num_blocks=BLOCKS_PER_GROUP))
            group = []
    if group:
        parts.append(ray.data.from_items(group, override_num_blocks=math.ceil(len(group) / rows_per_block)))
    if not parts:
        return None
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def run_actor_pool(
    rows: Iterable[Mapping[str, Any]],
    actor_cls: type,
    constructor_args: Sequence[Any],
    options: RayOptions,
) -> Iterator[dict[str, np.ndarray]]:
    """Output batches of ``actor_cls`` mapped over ``rows`` (dicts of plain values) by a fixed actor pool.

    Blocks hold ``BATCHES_PER_BLOCK`` actor batches, so every actor of the pool has blocks to work
    on. Each actor is built once with ``constructor_args`` and called on numpy batches of up to
    ``options.batch_size`` rows. Batches come back as the actors finish them, not in input order:
    callers carry their own row ids. Needs an open :func:`ray_session`.
    """
    ray = import_ray()
    dataset = _dataset(ray, rows, options.batch_size * BATCHES_PER_BLOCK)
    if dataset is None:
        return
    mapped = dataset.map_batches(
        actor_cls,
        fn_constructor_args=tuple(constructor_args),
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        batch_size=options.batch_size,
        num_cpus=options.cpus_per_actor,
        batch_format="numpy",
    )
    yield from mapped.iter_batches(batch_size=None, batch_format="numpy")


def set_actor_threads(threads: int) -> None:
    """Pin torch's intra-op threads in an actor to its CPU reservation (no oversubscription)."""
    import torch

    torch.set_num_threads(threads)


__all__ = ["RayOptions", "import_ray", "ray_session", "run_actor_pool", "set_actor_threads"]
