"""The scorer a search node embeds: grade probabilities, OOD score and routing in one pass.

    scorer = Scorer.load("bundle/")
    results = scorer.score("szechwan cuisine", ["Mapo tofu", "Afghan cuisine"])

Results come back in input order as frozen dataclasses of plain Python values. The caller's
inputs are never mutated. A fallback (any callable grading a list of pairs) receives the routed
pairs; when it fails, is slow to the point of raising, or returns garbage, the student's answer
stands and the result says why — nothing from the fallback raises into the caller.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from darl_lite.budget import RouteBudget
from darl_lite.bundle import ROLE_TOKENIZER, Bundle, load_bundle, model_role, ood_role
from darl_lite.calibration import softmax
from darl_lite.cascade import NOTE_CALL_BUDGET, NOTE_LIST_BUDGET, NOTE_WINDOW_BUDGET, CallPlan, plan_call
from darl_lite.errors import BundleError, InputError
from darl_lite.inference import ModelOutputs, RelevanceModel, SessionConfig
from darl_lite.ood import MahalanobisDetector
from darl_lite.ood_scale import OODScale
from darl_lite.ranking import RankedItem, check_top_k, rank_results
from darl_lite.routing import RoutingPolicy
from darl_lite.shift_routing import ROLE_SHIFT, ShiftRouting
from darl_lite.small_call import NOTE_NO_FALLBACK, SMALL_CALL_PAIRS, RowPlan, plan_rows

logger = logging.getLogger(__name__)

#: Grades a list of (query, item) pairs: one probability row per pair, in order.
Fallback = Callable[[list[tuple[str, str]]], ArrayLike]


@dataclass(frozen=True, slots=True)
class PairScore:
    """The grade of one query–item pair."""

    probabilities: tuple[float, ...]  # one per grade, in the bundle's grade order
    expected_relevance: float  # sum of probability × gain
    grade: int  # the most probable grade (for a shifted query: after its kind's prior correction)
    ood_score: float  # higher = further from the training distribution
    routed: bool  # the pair was sent to the LLM (or would be, with no fallback)
    #: "llm" when the LLM answered: ``grade`` comes from its answer (blended with the student's by the
    #: bundle's shift routing ``teacher_weight``, 1.0 = the LLM alone), and so do ``probabilities``
    #: for the pairs of a routed list head; a pair routed on its own keeps the student's
    #: ``probabilities`` (they rank its list, and one model ranks a list) under a bundle with shift
    #: routing, the LLM's answer without one
    source: Literal["student", "llm"]
    truncated: bool  # the pair was cut to the bundle's max_length
    note: str = ""  # why the student's answer stands where routing wanted the LLM
    #: share of in-distribution dev pairs whose OOD score is lower, in [0, 1] (darl_lite.ood_scale);
    #: None for a bundle exported without the quantile table (re-export it to get one)
    ood_percentile: float | None = None
    #: how much the query looks like a known kind of shifted traffic, in [0, 1] (0 without a detector)
    query_shift: float = 0.0


@dataclass(frozen=True)
class ScoredArrays:
    """Array form of a scoring call, for evaluation code that wants numpy, not objects."""

    probabilities: NDArray[np.float64]  # (N, C) final (student or LLM)
    student_probabilities: NDArray[np.float64]  # (N, C) calibrated student
    logits: NDArray[np.float32]  # (N, C) raw student logits
    ood_scores: NDArray[np.float64]  # (N,)
    candidate: NDArray[np.bool_]  # routing wanted the LLM
    routed: NDArray[np.bool_]  # within budget
    from_llm: NDArray[np.bool_]  # the fallback answered
    truncated: NDArray[np.bool_]
    notes: list[str]
    query_shift: NDArray[np.float64] | None = None  # (N,) the query's shift probability
    list_routed: NDArray[np.bool_] | None = None  # routed as part of its query's list head
    #: (N,) final grade decisions: the LLM's argmax, or the student's after its kind's prior correction
    grades: NDArray[np.intp] | None = None


class Scorer:
    """Scores pairs with a bundle. One instance serves many threads and many asyncio tasks.

    ``budget`` caps the LLM's share over a sliding window across calls, on top of the routing
    policy's per-call cap. ``executor`` runs :meth:`ascore` / :meth:`ascore_many` (default: the
    event loop's default thread pool); onnxruntime and tokenizers release the GIL, so threads score
    in parallel and the event loop is never blocked.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        precision: str = "int8",
        session: SessionConfig | None = None,
        batch_size: int = 32,
        routing: RoutingPolicy | None = None,
        fallback: Fallback | None = None,
        budget: RouteBudget | None = None,
        executor: Executor | None = None,
    ) -> None:
        if precision not in bundle.precisions:
            raise BundleError(
                f"bundle {bundle.directory} has no {precision!r} model; it has {bundle.precisions}"
            )
        manifest = bundle.manifest
        self.bundle = bundle
        self.precision = precision
        self.grade_names = bundle.grade_names
        self.gains = np.asarray(bundle.grade_gains, np.float64)
        self._gain_list: list[float] = self.gains.tolist()
        self.temperature = float(manifest.get("calibration", {}).get("temperature", 1.0))
        if not self.temperature > 0:
            raise BundleError(
                f"{bundle.directory}: calibration temperature must be > 0, got {self.temperature}"
            )
        #: the onnxruntime options the model runs with (threads, spinning, rewrites)
        self.session_config = session or SessionConfig()
        self.model = RelevanceModel(
            bundle.path_of(model_role(precision)),
            bundle.path_of(ROLE_TOKENIZER),
            max_length=bundle.max_length,
            session=session,
            batch_size=batch_size,
        )
        if self.model.n_grades not in (None, len(self.grade_names)):
            raise BundleError(
                f"{bundle.directory}: the model gives {self.model.n_grades} grades, "
                f"the manifest names {len(self.grade_names)}"
            )
        self.detector = MahalanobisDetector.load(bundle.path_of(ood_role(precision)))
        self.ood_scale = OODScale.from_manifest(manifest, precision)
        self.routing = routing or RoutingPolicy.from_manifest(manifest, precision)
        #: Query-level shift routing (whole shifted lists, prior correction); None without the file.
        self.shift = (
            ShiftRouting.load(str(bundle.path_of(ROLE_SHIFT))) if ROLE_SHIFT in manifest["files"] else None
        )
        self.fallback = fallback
        self.budget = budget
        self.executor = executor

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        precision: str = "int8",
        session: SessionConfig | None = None,
        batch_size: int = 32,
        routing: RoutingPolicy | None = None,
        fallback: Fallback | None = None,
        budget: RouteBudget | None = None,
        executor: Executor | None = None,
    ) -> Scorer:
        """Load and verify (sha256 of every file) the bundle at ``directory`` and build a scorer.

        Args:
            precision: which graph to run, ``"int8"`` (default) or ``"fp32"``; the bundle must carry it.
            session: onnxruntime threads, graph optimisation and providers (default: onnxruntime
                picks the threads, CPU provider).
            batch_size: pairs per onnxruntime run; larger batches pad more, smaller ones call more.
            routing: who goes to the LLM; default: the policy the export fitted (the manifest's).
            fallback: grades the routed pairs (e.g. :class:`darl_lite.llm.OpenAIGradeClient`);
                None keeps the student's answer and notes it.
            budget: a sliding-window cap on the routed share across calls
                (:class:`darl_lite.RouteBudget`), on top of the policy's per-call cap.
            executor: runs :meth:`ascore` and friends; default: the event loop's thread pool.
        """
        return cls(
            load_bundle(directory),
            precision=precision,
            session=session,
            batch_size=batch_size,
            routing=routing,
            fallback=fallback,
            budget=budget,
            executor=executor,
        )

    # ----------------------------------------------------------------------------------------------
    def score(self, query: str, items: Sequence[str]) -> list[PairScore]:
        """Grade every item against one query; an empty item list gives an empty list."""
        flat = flatten_query(query, items)
        return self._score_pairs(flat.queries, flat.items)

    def score_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[PairScore]]:
        """Many queries in one batch: ``[(query, items), ...]`` → one result list per query."""
        flat = flatten_requests(requests)
        return self.split_results(self.score_arrays(flat.queries, flat.items), flat.sizes)

    def split_results(self, scored: ScoredArrays, sizes: Sequence[int]) -> list[list[PairScore]]:
        """``scored`` as one result list per request of ``sizes`` pairs, as :meth:`score_many` gives."""
        flat = self._to_results(scored)
        out, start = [], 0
        for size in sizes:
            out.append(flat[start : start + size])
            start += size
        return out

    def rank(
        self, query: str, items: Sequence[str], top_k: int | None = None, return_items: bool = False
    ) -> list[RankedItem]:
        """The items sorted by expected relevance, best first (ties in input order), each with its
        input ``index``; ``top_k`` keeps the best k (None: all). Same validation as :meth:`score`."""
        top_k = check_top_k(top_k)
        results = self.score(query, items)
        gains = self.bundle.grade_gains
        return rank_results(results, items, gains=gains, top_k=top_k, return_items=return_items)

    async def arank(
        self, query: str, items: Sequence[str], top_k: int | None = None, return_items: bool = False
    ) -> list[RankedItem]:
        """:meth:`rank` for async servers, run in ``executor``."""
        loop = asyncio.get_running_loop()
        call = functools.partial(self.rank, query, items, top_k=top_k, return_items=return_items)
        return await loop.run_in_executor(self.executor, call)

    def predict(self, pairs: Sequence[tuple[str, str]]) -> list[PairScore]:
        """Grade mixed ``(query, item)`` pairs in one batch; results in input order.

        Validated like :meth:`score`: errors name the pair, e.g. ``pairs[3].item is empty``.
        """
        queries: list[str] = []
        items: list[str] = []
        for i, (query, item) in enumerate(_two_tuples(pairs, "pairs", "(query, item)")):
            _check_text(query, f"pairs[{i}].query")
            _check_text(item, f"pairs[{i}].item")
            queries.append(query)
            items.append(item)
        return self._score_pairs(queries, items)

    async def ascore(self, query: str, items: Sequence[str]) -> list[PairScore]:
        """:meth:`score` for async servers: the work runs in ``executor``, not on the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(self.score, query, items))

    async def ascore_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[PairScore]]:
        """:meth:`score_many` for async servers, run in ``executor``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(self.score_many, requests))

    def score_arrays(self, queries: Sequence[str], items: Sequence[str]) -> ScoredArrays:
        """Score aligned pairs and return arrays; inputs are trusted to be validated strings."""
        return self.finish_arrays(queries, items, self.model.run(queries, items))

    def finish_arrays(
        self, queries: Sequence[str], items: Sequence[str], outputs: ModelOutputs
    ) -> ScoredArrays:
        """Everything after the model pass: OOD, routing (:func:`plan_call`) and the fallback.

        ``outputs`` are the model's outputs for exactly these pairs, e.g. rows of a larger pass that
        scored several requests together (:mod:`darl_lite.serve_batching`): routing caps and budgets
        apply to this call's pairs alone, and the fallback (maybe a slow HTTP call) runs here, never
        inside the model pass.
        """
        if outputs.ood is not None:  # computed in the graph's own pass (export wrote the nodes)
            ood = outputs.ood.astype(np.float64)
        else:
            ood = self.detector.score(outputs.pooled) if len(queries) else np.zeros(0)
        plan = plan_call(outputs.logits, ood, queries, gains=self.gains, **self._routing_args())
        return self._answer(queries, items, outputs, ood, plan)

    def _score_pairs(self, queries: Sequence[str], items: Sequence[str]) -> list[PairScore]:
        """Results of validated aligned pairs: a small call is planned row by row
        (:mod:`darl_lite.small_call`), where numpy's per-call price would be a tenth of the call."""
        outputs = self.model.run(queries, items)
        if len(queries) <= SMALL_CALL_PAIRS:
            results = self._small_call(queries, items, outputs)
            if results is not None:
                return results
        return self._to_results(self.finish_arrays(queries, items, outputs))

    def _small_call(
        self, queries: Sequence[str], items: Sequence[str], outputs: ModelOutputs
    ) -> list[PairScore] | None:
        """The results of a call planned row by row; None where the row plan declines it (or the
        graph has no OOD output), before any budget is drawn."""
        if outputs.ood is None:
            return None
        ood = outputs.ood.tolist()
        plan = self._row_plan(queries, outputs.logits.tolist(), ood)
        if plan is None:
            return None
        if self.fallback is not None and any(plan.routed):
            ood64 = outputs.ood.astype(np.float64)
            return self._to_results(self._answer(queries, items, outputs, ood64, plan.to_call_plan()))
        return self._row_results(plan, ood, outputs.truncated.tolist())

    def _row_plan(
        self, queries: Sequence[str], logits: list[list[float]], ood: list[float]
    ) -> RowPlan | None:
        """:func:`plan_rows` with this scorer's temperature, routing, shift routing and budget."""
        return plan_rows(logits, ood, queries, **self._routing_args())

    def _routing_args(self) -> dict[str, Any]:
        """What a call's plan takes from this scorer, row by row or in arrays."""
        return {
            "temperature": self.temperature,
            "policy": self.routing,
            "shift": self.shift,
            "budget": self.budget,
        }

    def _answer(
        self,
        queries: Sequence[str],
        items: Sequence[str],
        outputs: ModelOutputs,
        ood: NDArray[np.float64],
        plan: CallPlan,
    ) -> ScoredArrays:
        """The call's arrays from its plan: the routed pairs' answers from the fallback, if any."""
        student, notes, routed = plan.student, plan.notes, plan.routed
        n = len(queries)
        final, grades = student, plan.grades  # copied only where the teacher's answer goes in
        from_llm = np.zeros(n, bool)
        routed_index = np.flatnonzero(routed)
        if len(routed_index):
            if self.fallback is None:
                for i in routed_index:
                    notes[i] = NOTE_NO_FALLBACK
            else:
                routed_pairs = [(queries[i], items[i]) for i in routed_index.tolist()]
                answer, error = self._ask_fallback(self.fallback, routed_pairs)
                if answer is None:
                    for i in routed_index:
                        notes[i] = f"fallback failed ({error}): student answer kept"
                else:
                    final, grades = student.copy(), plan.grades.copy()
                    final[routed_index], grades[routed_index] = plan.fallback_answer(answer, self.shift)
                    from_llm[routed_index] = True
        return ScoredArrays(
            probabilities=final,
            student_probabilities=student,
            logits=outputs.logits,
            ood_scores=ood,
            candidate=plan.candidate,
            routed=routed,
            from_llm=from_llm,
            truncated=outputs.truncated,
            notes=notes,
            query_shift=plan.query_shift,
            list_routed=plan.list_routed,
            grades=grades,
        )

    def _ask_fallback(
        self, fallback: Fallback, pairs: list[tuple[str, str]]
    ) -> tuple[NDArray[np.float64] | None, str]:
        try:
            raw = fallback(list(pairs))
            answer = np.asarray(raw, dtype=np.float64)
        except Exception as exc:  # a fallback must never take the node down
            logger.warning("fallback raised %s: %s", type(exc).__name__, exc)
            return None, f"{type(exc).__name__}: {exc}"
        expected = (len(pairs), len(self.grade_names))
        if answer.shape != expected:
            logger.warning("fallback returned shape %s, expected %s", answer.shape, expected)
            return None, f"returned shape {answer.shape}, expected {expected}"
        sums = answer.sum(axis=1)
        if not np.all(np.isfinite(answer)) or (answer < 0).any() or not np.allclose(sums, 1.0, atol=1e-3):
            logger.warning("fallback returned rows that are not probability distributions")
            return None, "returned rows that are not probability distributions"
        return answer / sums[:, None], ""

    def _to_results(self, scored: ScoredArrays) -> list[PairScore]:
        probs = scored.probabilities
        expected = np.einsum("nc,c->n", probs, self.gains, optimize=False)  # no BLAS pool: see ood.py
        scale = self.ood_scale
        percentiles = scale.percentiles(scored.ood_scores).tolist() if scale else [None] * len(scored.notes)
        shift = scored.query_shift if scored.query_shift is not None else np.zeros(len(scored.notes))
        # One tolist() per array, then plain zips: no numpy scalar is built per field.
        return [
            PairScore(tuple(p), e, g, o, r, "llm" if f else "student", t, note, pct, qs)
            for p, e, g, o, r, f, t, note, pct, qs in zip(
                probs.tolist(),
                expected.tolist(),
                (scored.grades if scored.grades is not None else probs.argmax(axis=1)).tolist(),
                scored.ood_scores.tolist(),
                scored.routed.tolist(),
                scored.from_llm.tolist(),
                scored.truncated.tolist(),
                scored.notes,
                percentiles,
                shift.tolist(),
                strict=True,
            )
        ]

    def _row_results(self, plan: RowPlan, ood: list[float], truncated: list[bool]) -> list[PairScore]:
        """:meth:`_to_results` of a row plan that the student answers (nothing routed, or no fallback)."""
        scale = self.ood_scale
        percentiles = scale.percentiles(ood).tolist() if scale else [None] * len(ood)
        gains = self._gain_list
        return [
            PairScore(
                tuple(p),
                sum(a * g for a, g in zip(p, gains, strict=True)),
                grade,
                o,
                r,
                "student",
                t,
                NOTE_NO_FALLBACK if r else note,
                pct,
                qs,
            )
            for p, grade, o, r, t, note, pct, qs in zip(
                plan.student,
                plan.grades,
                ood,
                plan.routed,
                truncated,
                plan.notes,
                percentiles,
                plan.query_shift,
                strict=True,
            )
        ]


@dataclass(frozen=True)
class FlatRequests:
    """Validated requests as aligned pairs: ``sizes[k]`` pairs of request ``k``, in order."""

    queries: list[str]
    items: list[str]
    sizes: list[int]

    @property
    def n_pairs(self) -> int:
        return len(self.queries)


def flatten_requests(requests: Sequence[tuple[str, Sequence[str]]]) -> FlatRequests:
    """``[(query, items), ...]`` validated as :meth:`Scorer.score_many` does (errors name
    ``requests[i].query`` / ``requests[i].items[j]``) and flattened into aligned pairs."""
    queries: list[str] = []
    items: list[str] = []
    sizes: list[int] = []
    for i, (query, its) in enumerate(_two_tuples(requests, "requests", "(query, items)")):
        _check_text(query, f"requests[{i}].query")
        _check_items(its, f"requests[{i}].items")
        queries.extend([query] * len(its))
        items.extend(its)
        sizes.append(len(its))
    return FlatRequests(queries, items, sizes)


def flatten_query(query: str, items: Sequence[str]) -> FlatRequests:
    """One query's items validated as :meth:`Scorer.score` does (errors name ``query`` / ``items[j]``)."""
    _check_text(query, "query")
    _check_items(items, "items")
    return FlatRequests([query] * len(items), list(items), [len(items)])


def _two_tuples(values: object, field: str, shape: str) -> list[tuple[Any, Any]]:
    """``values`` as a list of 2-tuples, or :class:`InputError` naming ``field[i]`` (``shape`` says
    what one should be, e.g. ``"(query, item)"``); the members are checked by the caller."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InputError(f"{field} must be a list of {shape} tuples, got {type(values).__name__}")
    for i, value in enumerate(values):
        if isinstance(value, (str, bytes)) or not (isinstance(value, Sequence) and len(value) == 2):
            raise InputError(f"{field}[{i}] must be a {shape} tuple, got {type(value).__name__}")
    return [(value[0], value[1]) for value in values]


def _check_text(value: object, field: str) -> None:
    if not isinstance(value, str):
        raise InputError(f"{field} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{field} is empty or whitespace only; give it some text")


def _check_items(items: object, field: str) -> None:
    if isinstance(items, (str, bytes)):
        raise InputError(f"{field} must be a list of strings, got a single {type(items).__name__}")
    if not isinstance(items, Sequence):
        raise InputError(f"{field} must be a list of strings, got {type(items).__name__}")
    for i, item in enumerate(items):
        _check_text(item, f"{field}[{i}]")


__all__ = [
    "NOTE_CALL_BUDGET",
    "NOTE_LIST_BUDGET",
    "NOTE_WINDOW_BUDGET",
    "Fallback",
    "FlatRequests",
    "PairScore",
    "RankedItem",
    "ScoredArrays",
    "Scorer",
    "flatten_query",
    "flatten_requests",
    "softmax",
]
