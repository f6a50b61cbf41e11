"""Coalesce concurrent requests into one onnxruntime pass, so small requests stop paying its fixed cost each.

    batcher = RequestBatcher(scorer, max_batch_pairs=256)
    results = await batcher.submit([("szechwan cuisine", ["Mapo tofu", "Afghan cuisine"])])

Requests wait in a queue; a consumer task per *model worker* (default 2, each its own onnxruntime
session with an equal share of the scorer's threads, on its own single-thread executor) takes
everything queued (up to ``max_batch_pairs`` pairs; a larger request goes alone and the model chunks
it), runs the concatenated pairs through its session, then hands each request its rows. Under load
each worker runs its own pass, so one pass's Python work never stalls another's parallel section;
a pass that finds every other worker idle is split across all of them, so a lone request still
uses every core. Routing, budgets and the
fallback (``Scorer.finish_arrays``) run per request on the scorer's executor: a routing cap keeps its
per-call meaning and a slow fallback never holds the model thread. While one pass runs, new requests
queue and go together in the next (natural batching); while another pass runs, a free worker also
waits up to ``gather_wait_ms`` (default 2) for ``gather_pairs`` queued pairs (default 64) instead of
starting a pass on the first request to arrive, but only while company can still come: while fewer
requests are held (queued or in a pass) than the most held at once in the last second or two, the
clients' concurrency (a lone request never waits: nothing else runs; a request that makes the
held count whole again goes at once); ``max_wait_ms`` > 0 also lingers that long for company
after the first request arrives.

Each request gets what ``scorer.score_many`` gives for it alone, up to the int8 graph's batch effect:
the int8 graph is dynamically quantized, so activation scales depend on the other rows of a batch and a
pair's probabilities may move slightly with its neighbours (fp32: equal up to float rounding).

Robustness: a cancelled request (client gone) is skipped; when a batched pass raises, each request is
retried alone so a bad one fails only itself; the consumer logs and carries on whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from darl_lite.errors import InputError
from darl_lite.inference import ModelOutputs, RelevanceModel
from darl_lite.scorer import FlatRequests, PairScore, Scorer, flatten_requests

logger = logging.getLogger(__name__)

#: Default cap on the pairs of one coalesced model pass.
DEFAULT_MAX_BATCH_PAIRS = 256
#: Default number of model workers. Measured on 2 cores (docs/benchmarks.md, "Serving under
#: load"): two one-thread sessions served 1.1-1.6x the pairs per second of one two-thread session at
#: concurrency 1-16, at equal or better p99; a lone pass is split across both.
DEFAULT_MODEL_WORKERS = 2
#: A pass with no other worker busy is split across the workers from this many pairs on.
SPLIT_MIN_PAIRS = 8
#: While another worker's pass runs, a free worker waits up to ``DEFAULT_GATHER_WAIT_MS`` for this
#: many queued pairs before it starts its own. Why: under load the clients' next requests arrive one
#: by one as the previous answers go out, and a free worker used to start a pass on the first of
#: them alone: at 10 items x concurrency 16, 233 of 590 passes served one request, and a one-thread
#: pass costs 1.1-1.2 ms of CPU per pair for one 10-item request against 0.76-0.79 for eight or more
#: (in process, the real int8 bundle); with the wait, the same 2,500 requests took 401 passes, not 553.
DEFAULT_GATHER_PAIRS = 64
#: How long a free worker waits for company at most (``--gather-wait-ms``; 0 turns it off).
DEFAULT_GATHER_WAIT_MS = 2.0
#: The clients' concurrency is the most requests held at once over the last one to two windows of
#: this many seconds. A free worker waits for company only while fewer are held: at 10 items x
#: concurrency 4 the lone request a free worker finds is often the last one missing (the other three
#: are in the running pass), and waiting for 64 pairs that cannot come cost the full wait each pass.
CONCURRENCY_WINDOW_S = 1.0

Results = list[list[PairScore]]


def check_batching_options(
    max_batch_pairs: object,
    max_wait_ms: object = 0.0,
    model_workers: object = DEFAULT_MODEL_WORKERS,
    gather_wait_ms: object = DEFAULT_GATHER_WAIT_MS,
    *,
    name: str = "max_batch_pairs",
) -> None:
    """:class:`InputError` naming the option (and its ``darl-lite serve`` flag) that is unusable;
    ``name`` is what the first one is called."""
    for option, value in ((name, max_batch_pairs), ("model_workers", model_workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            flag = (
                f" (--{option.replace('_', '-')})" if option in ("max_batch_pairs", "model_workers") else ""
            )
            raise InputError(f"{option}{flag} must be an integer >= 1, got {value!r}")
    for option, value in (("max_wait_ms", max_wait_ms), ("gather_wait_ms", gather_wait_ms)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise InputError(f"{option} must be a finite number >= 0, got {value!r}")


@dataclass
class _Entry:
    """One submitted call waiting for its results."""

    flat: FlatRequests
    future: asyncio.Future[Results]


class RequestBatcher:
    """Coalesces concurrent :meth:`submit` calls into shared model passes (see the module docstring).

    Built anywhere; it binds to the running event loop on the first :meth:`submit` (and rebinds if a
    later one runs in another loop). ``observe(pairs, requests)`` is called once per model pass, on
    the event loop. :meth:`close` stops it; a later :meth:`submit` starts it again.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS,
        max_wait_ms: float = 0.0,
        observe: Callable[[int, int], None] | None = None,
        model_workers: int = DEFAULT_MODEL_WORKERS,
        gather_pairs: int = DEFAULT_GATHER_PAIRS,
        gather_wait_ms: float = DEFAULT_GATHER_WAIT_MS,
    ) -> None:
        check_batching_options(max_batch_pairs, max_wait_ms, model_workers, gather_wait_ms)
        check_batching_options(gather_pairs, name="gather_pairs")
        self.scorer = scorer
        #: Model passes that may run at once. With more than one, each worker has its own
        #: onnxruntime session with an equal share of the scorer's threads.
        self.model_workers = model_workers
        if model_workers == 1:
            self._models = [scorer.model]
        else:
            threads = max(1, _scorer_threads(scorer) // model_workers)
            self._models = [_worker_model(scorer, threads) for _ in range(model_workers)]
        self.max_batch_pairs = max_batch_pairs
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.gather_pairs = gather_pairs
        self.gather_wait_s = float(gather_wait_ms) / 1000.0
        self._observe = observe
        #: model passes run, pairs through them, submitted calls they served
        self.passes = 0
        self.pairs = 0
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Entry] = deque()
        self._queued_pairs = 0
        self._wakeup: asyncio.Event | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self._finishing: set[asyncio.Task[None]] = set()
        self._model_threads: list[ThreadPoolExecutor] = []
        self._busy = 0  # model passes running now
        self._in_passes = 0  # calls taken into model passes and not yet handed their results
        self._peak_now = 0  # most calls held at once in this concurrency window
        self._peak_before = 0  # ... and in the one before
        self._window_start = 0.0

    # ----------------------------------------------------------------------------------------------
    async def submit(self, requests: Sequence[tuple[str, Sequence[str]]]) -> Results:
        """``scorer.score_many(requests)``, scored in a model pass shared with concurrent calls.

        Validated as ``score_many`` validates (:class:`InputError` naming ``requests[i]...``) before
        anything is queued, so a bad call never joins a batch.
        """
        return await self.submit_flat(flatten_requests(requests))

    async def submit_flat(self, flat: FlatRequests) -> Results:
        """:meth:`submit` for requests already validated and flattened (:func:`flatten_requests`,
        :func:`~darl_lite.scorer.flatten_query`); one result list per entry of ``flat.sizes``."""
        loop = asyncio.get_running_loop()
        wakeup = self._bind(loop)
        future: asyncio.Future[Results] = loop.create_future()
        self._pending.append(_Entry(flat, future))
        self._note_peak(loop.time())
        self._queued_pairs += flat.n_pairs
        wakeup.set()
        return await future  # cancelling the caller cancels ``future``: the consumer skips it

    async def close(self) -> None:
        """Stop the consumer, fail whatever is still queued, release the model thread."""
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            if not consumer.done():
                consumer.cancel()
                if consumer.get_loop() is asyncio.get_running_loop():
                    await asyncio.wait({consumer})  # returns once it stopped; raises nothing
        self._fail_pending(RuntimeError("the server is shutting down"))
        for thread in self._model_threads:
            thread.shutdown(wait=False)
        self._model_threads = []
        self._loop = None
        self._wakeup = None

    @property
    def queued(self) -> int:
        """Calls waiting for a model pass."""
        return len(self._pending)

    # ----------------------------------------------------------------------------------------------
    def _bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        """The wake-up event of ``loop``'s consumer, starting (or restarting) it as needed."""
        if self._loop is not loop:
            if self._loop is not None:
                logger.warning("request batcher moved to a new event loop; calls queued on the old one fail")
                self._fail_pending(RuntimeError("the event loop serving this request stopped"))
            self._loop, self._wakeup, self._consumers = loop, asyncio.Event(), []
            self._in_passes, self._peak_now, self._peak_before = 0, 0, 0
        assert self._wakeup is not None
        if not self._model_threads:
            self._model_threads = [
                ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"darl-lite-model-{k}")
                for k in range(self.model_workers)
            ]
        if len(self._consumers) != self.model_workers or any(c.done() for c in self._consumers):
            for consumer in self._consumers:
                consumer.cancel()
            self._consumers = [
                loop.create_task(self._consume(self._wakeup, k), name=f"darl-lite-batcher-{k}")
                for k in range(self.model_workers)
            ]
        return self._wakeup

    def _fail_pending(self, error: Exception) -> None:
        loop = self._loop
        while self._pending:
            entry = self._pending.popleft()
            if entry.future.done():
                continue
            if loop is None or loop.is_closed():
                continue
            try:
                if loop is asyncio.get_running_loop():
                    entry.future.set_exception(error)
                    continue
            except RuntimeError:  # no running loop in this thread
                pass
            loop.call_soon_threadsafe(_set_exception, entry.future, error)
        self._queued_pairs = 0

    async def _consume(self, wakeup: asyncio.Event, worker: int) -> None:
        """One worker's consumer: wait, take a batch, run it; never dies of an error (only of close())."""
        while True:
            await wakeup.wait()
            wakeup.clear()
            try:
                if self.max_wait_s > 0:
                    await self._linger(wakeup)
                while self._pending:
                    await self._gather(wakeup)
                    await self._run_guarded(self._take(), worker)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop every later request
                logger.exception("request batcher: unexpected error; carrying on")

    async def _run_guarded(self, batch: list[_Entry], worker: int) -> None:
        """:meth:`_run`, failing (never stranding) the batch's calls if it breaks or is cancelled."""
        self._in_passes += len(batch)
        try:
            await self._run(batch, worker)
        except asyncio.CancelledError:
            for entry in batch:
                _set_exception(entry.future, RuntimeError("the server is shutting down"))
            raise
        except Exception as exc:
            logger.exception("request batcher: a pass over %d calls failed unexpectedly", len(batch))
            for entry in batch:
                _set_exception(entry.future, exc)
        finally:
            self._in_passes -= len(batch)

    async def _linger(self, wakeup: asyncio.Event) -> None:
        """Wait up to ``max_wait_ms`` for more calls, unless a full batch is already queued."""
        await _wait_until(wakeup, self.max_wait_s, lambda: self._queued_pairs >= self.max_batch_pairs)

    async def _gather(self, wakeup: asyncio.Event) -> None:
        """While another pass runs, wait up to ``gather_wait_ms`` for ``gather_pairs`` queued pairs
        (ends early when every pass has finished, or when no more company can come: then nothing
        is gained by waiting)."""
        if self.gather_wait_s <= 0 or self._busy == 0 or not self._company_may_come():
            return
        await _wait_until(
            wakeup,
            self.gather_wait_s,
            lambda: (
                self._busy == 0 or self._queued_pairs >= self.gather_pairs or not self._company_may_come()
            ),
        )

    def _held(self) -> int:
        """Calls submitted and not answered yet: queued, in a model pass, or finishing."""
        return len(self._pending) + self._in_passes + len(self._finishing)

    def _note_peak(self, now: float) -> None:
        """Keep the most calls held at once, per concurrency window (this one and the one before;
        a window that ended more than a window ago, after a quiet spell, counts for nothing)."""
        elapsed = now - self._window_start
        if elapsed > CONCURRENCY_WINDOW_S:
            self._peak_before = self._peak_now if elapsed <= 2 * CONCURRENCY_WINDOW_S else 0
            self._peak_now, self._window_start = 0, now
        self._peak_now = max(self._peak_now, self._held())

    def _company_may_come(self) -> bool:
        """Fewer calls are held now than at the recent peak: some clients are between an answer and
        their next request, so a free worker waiting for them may get a fuller pass."""
        return self._held() < max(self._peak_now, self._peak_before)

    def _take(self) -> list[_Entry]:
        """The queued calls of the next pass: the first live one, then more while they fit the cap."""
        batch: list[_Entry] = []
        total = 0
        while self._pending:
            entry = self._pending[0]
            if entry.future.done():  # cancelled: the client went away
                self._pending.popleft()
                self._queued_pairs -= entry.flat.n_pairs
                continue
            n = entry.flat.n_pairs
            if batch and total + n > self.max_batch_pairs:
                break
            self._pending.popleft()
            self._queued_pairs -= n
            batch.append(entry)
            total += n
        return batch

    async def _run(self, batch: list[_Entry], worker: int) -> None:
        """One model pass over ``batch``'s pairs, then each call finishes on its own."""
        if len(batch) == 1:
            entry = batch[0]
            try:
                outputs = await self._model_pass(entry.flat.queries, entry.flat.items, 1, worker)
            except Exception as exc:
                _set_exception(entry.future, exc)
                return
            self._finish_later(entry, outputs)
            return
        queries = [q for entry in batch for q in entry.flat.queries]
        items = [t for entry in batch for t in entry.flat.items]
        try:
            outputs = await self._model_pass(queries, items, len(batch), worker)
        except Exception as exc:
            logger.warning(
                "batched model pass over %d calls failed (%s: %s); retrying each alone",
                len(batch), type(exc).__name__, exc,
            )  # fmt: skip
            for entry in batch:
                if not entry.future.done():
                    await self._run([entry], worker)
            return
        start = 0
        for entry in batch:
            stop = start + entry.flat.n_pairs
            if not entry.future.done():
                self._finish_later(entry, outputs.rows(start, stop))
            start = stop

    async def _model_pass(
        self, queries: list[str], items: list[str], calls: int, worker: int
    ) -> ModelOutputs:
        model = self._models[worker]
        if not queries:  # nothing to score: no thread hop, no pass counted
            return model.run(queries, items)
        loop = asyncio.get_running_loop()
        # Alone (no other worker busy), a pass is split across every worker, so a lone request
        # still uses every core; under load each worker runs its own pass.
        lone = self.model_workers > 1 and self._busy == 0 and len(queries) >= SPLIT_MIN_PAIRS
        self._busy += 1
        try:
            if lone:
                cuts = np.linspace(0, len(queries), self.model_workers + 1).astype(int).tolist()
                parts = await asyncio.gather(
                    *(
                        loop.run_in_executor(thread, m.run, queries[a:b], items[a:b])
                        for thread, m, a, b in zip(
                            self._model_threads, self._models, cuts[:-1], cuts[1:], strict=True
                        )
                    )
                )
                outputs = ModelOutputs.concat(parts)
            else:
                outputs = await loop.run_in_executor(self._model_threads[worker], model.run, queries, items)
        finally:
            self._busy -= 1
            if self._pending and self._wakeup is not None:
                self._wakeup.set()  # a worker gathering company (_gather) goes now
        self.passes += 1
        self.pairs += len(queries)
        self.requests += calls
        if self._observe is not None:
            try:
                self._observe(len(queries), calls)
            except Exception:  # metrics must never fail a request
                logger.exception("request batcher: observing a model pass failed")
        return outputs

    def _finish_later(self, entry: _Entry, outputs: ModelOutputs) -> None:
        """Routing, fallback and results of one call. Without a fallback that is a little numpy,
        done here on the loop (cheaper than a thread hop per request); with one (maybe a slow HTTP
        call) it runs on the scorer's executor, off the consumer."""
        if self.scorer.fallback is None:
            _settle(entry.future, lambda: self._results(entry, outputs))
            return
        task = asyncio.get_running_loop().create_task(self._finish(entry, outputs))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    def _results(self, entry: _Entry, outputs: ModelOutputs) -> Results:
        flat = entry.flat
        scored = self.scorer.finish_arrays(flat.queries, flat.items, outputs)
        return self.scorer.split_results(scored, flat.sizes)

    async def _finish(self, entry: _Entry, outputs: ModelOutputs) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.scorer.executor, self._results, entry, outputs)
        except asyncio.CancelledError:
            entry.future.cancel()
            raise
        except Exception as exc:
            _set_exception(entry.future, exc)
        else:
            if not entry.future.done():
                entry.future.set_result(results)


def _settle(future: asyncio.Future[Results], work: Callable[[], Results]) -> None:
    """``future`` gets ``work()``'s results, or the exception it raised (unless already done)."""
    try:
        results = work()
    except Exception as exc:
        _set_exception(future, exc)
    else:
        if not future.done():
            future.set_result(results)


def _scorer_threads(scorer: Scorer) -> int:
    """The intra-op threads the scorer's options ask for (0, onnxruntime's choice: the cores)."""
    return scorer.session_config.intra_op_threads or os.cpu_count() or 1


def _worker_model(scorer: Scorer, threads: int) -> RelevanceModel:
    """Another session on the scorer's graph and tokenizer, with ``threads`` intra-op threads."""
    from darl_lite.bundle import ROLE_TOKENIZER, model_role

    model = scorer.model
    return RelevanceModel(
        scorer.bundle.path_of(model_role(scorer.precision)),
        scorer.bundle.path_of(ROLE_TOKENIZER),
        max_length=model.max_length,
        session=replace(scorer.session_config, intra_op_threads=threads),
        batch_size=model.batch_size,
    )


def _set_exception(future: asyncio.Future[Results], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


async def _wait_until(wakeup: asyncio.Event, seconds: float, done: Callable[[], bool]) -> None:
    """Return when ``done()`` holds (checked at each ``wakeup``) or after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not done():
        left = deadline - loop.time()
        if left <= 0:
            return
        wakeup.clear()
        try:
            await asyncio.wait_for(wakeup.wait(), left)
        except asyncio.TimeoutError:
            return


__all__ = [
    "CONCURRENCY_WINDOW_S",
    "DEFAULT_GATHER_PAIRS",
    "DEFAULT_GATHER_WAIT_MS",
    "DEFAULT_MAX_BATCH_PAIRS",
    "DEFAULT_MODEL_WORKERS",
    "SPLIT_MIN_PAIRS",
    "RequestBatcher",
    "check_batching_options",
]
