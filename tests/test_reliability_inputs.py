"""The bad-input matrix at the two outer doors: the command line and the HTTP API.

Every input gets a defined outcome: a score, or an error that names the field and the rule (exit
status 2 on the command line, 413/422 over HTTP), never a traceback or a 500.
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from uvicorn_thread import serve_in_thread

from darl_lite import Scorer, SessionConfig
from darl_lite.cli import main

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from darl_lite.serve import create_app  # noqa: E402

ODD_TEXT = {
    "emoji": "🍜🌶️ spicy noodles 🔥",
    "right_to_left": "مطبخ سيتشوان الحار",
    "mixed_scripts": "Sichuan 四川 кухня مطبخ",
    "chinese": "四川菜 麻婆豆腐",
    "null_byte": "mapo\x00doufu",
    "control_chars": "mapo\x07\x1b[31m doufu\t",
}

# --------------------------------------------------------------------------------------------------
# Command line


def _items(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "items.txt"
    path.write_bytes(content)
    return path


def _score(bundle: Path, items: Path | str, *extra: str, query: str = "Szechwan cuisine") -> list[str]:
    return ["score", str(bundle), "--query", query, "--items", str(items), "--precision", "fp32", *extra]


def test_cli_empty_items_file_prints_an_empty_result(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for content in (b"", b"\n\n  \n\t\n"):
        path = _items(tmp_path, content)
        assert main(_score(tiny_bundle_dir, path, "--json")) == 0
        assert json.loads(capsys.readouterr().out) == []
        assert main(_score(tiny_bundle_dir, path)) == 0
        assert capsys.readouterr().out.split() == ["expected", "grade", "ood", "ood%", "routed", "item"]


def test_cli_odd_but_valid_text_is_scored(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = [*ODD_TEXT.values(), "doufu " * 175_000]  # the last is a 1 MB line
    path = _items(tmp_path, "\n".join(texts).encode("utf-8"))
    assert main(_score(tiny_bundle_dir, path, "--json")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["item"] for r in rows] == texts
    assert all(math.isclose(sum(r["probabilities"]), 1.0, abs_tol=1e-6) for r in rows)
    assert [r["truncated"] for r in rows] == [False] * len(ODD_TEXT) + [True]
    # The table prints them too (stdout here is UTF-8).
    assert main(_score(tiny_bundle_dir, path, query="四川 🍜")) == 0
    assert "麻婆豆腐" in capsys.readouterr().out


def test_cli_query_from_undecodable_argv_is_scored(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``darl-lite score --query $'caf\\xe9'`` in a UTF-8 locale reaches Python as a lone surrogate."""
    path = _items(tmp_path, b"Mapo doufu\n")
    assert main(_score(tiny_bundle_dir, path, "--json", query="caf\udce9")) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert math.isclose(sum(row["probabilities"]), 1.0, abs_tol=1e-6)


def test_cli_items_file_with_invalid_utf8_is_an_error_naming_the_line(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _items(tmp_path, b"Mapo doufu\nAfghan \xff\xfe cuisine\n")
    assert main(_score(tiny_bundle_dir, path)) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 2" in err and "UTF-8" in err


def test_cli_items_on_stdin_with_invalid_utf8_is_an_error(
    tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"Mapo doufu\n\xc3\x28 bad\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(_score(tiny_bundle_dir, "-")) == 2
    assert "<stdin>" in capsys.readouterr().err


def test_cli_one_item_per_newline_only(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["page\x0cbreak", "line\u2028separator", "next\x85line", "windows line"]
    path = _items(tmp_path, ("\n".join(texts[:-1]) + "\n" + texts[-1] + "\r\n").encode("utf-8"))
    assert main(_score(tiny_bundle_dir, path, "--json")) == 0
    assert [r["item"] for r in json.loads(capsys.readouterr().out)] == texts


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda tmp, bundle: ["score", str(tmp / "nowhere"), "--query", "q", "--items", "{items}"],
            "does not exist",
        ),
        (lambda tmp, bundle: ["inspect", str(tmp / "nowhere")], "does not exist"),
        (lambda tmp, bundle: ["serve", str(tmp / "nowhere"), "--port", "0"], "does not exist"),
        (
            lambda tmp, bundle: ["score", str(bundle), "--query", "q", "--items", str(tmp / "none.txt")],
            "none.txt",
        ),
        (lambda tmp, bundle: ["score", str(bundle), "--query", "q", "--items", str(tmp)], "directory"),
        (lambda tmp, bundle: ["score", str(bundle), "--query", "\t", "--items", "{items}"], "query is empty"),
    ],
    ids=[
        "score-missing-bundle",
        "inspect-missing-bundle",
        "serve-missing-bundle",
        "missing-items",
        "items-is-dir",
        "blank-query",
    ],
)
def test_cli_errors_exit_2_with_the_cause(
    make: Any, message: str, tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = _items(tmp_path, b"Mapo doufu\n")
    argv = [arg.replace("{items}", str(items)) for arg in make(tmp_path, tiny_bundle_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("darl-lite: error: ") and message in err and "Traceback" not in err


def test_cli_damaged_bundle_names_the_file(
    bundle_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / manifest["files"]["ood.fp32"]["path"]).unlink()
    assert main(_score(bundle_copy, _items(tmp_path, b"x\n"))) == 2
    assert "ood_fp32.npz (ood.fp32) is missing" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pairs_csv", "teacher_line", "pattern"),
    [
        ("query,item,grade\nszechwan,mapo doufu,2\nszechwan,afghan cuisine,nan\n", None, r"line 3.*grade"),
        (
            "query,item,grade\nszechwan,mapo doufu,2\n",
            '{"query": "szechwan", "item": "mapo doufu", "probs": [NaN, 0.5, 0.5]}',
            r"line 1, field 'probs'\[0\]: must be finite",
        ),
        (
            "query,item,grade\nszechwan,mapo doufu,2\n",
            '{"query": "szechwan", "item": "mapo doufu", "probs": [0.2, Infinity, 0.5]}',
            r"line 1, field 'probs'\[1\]: must be finite",
        ),
    ],
    ids=["nan-grade-in-pairs", "nan-in-teacher-file", "infinity-in-teacher-file"],
)
def test_cli_nan_in_data_files_names_file_line_and_field(
    pairs_csv: str, teacher_line: str | None, pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(pairs_csv, encoding="utf-8")
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text((teacher_line or '{"query": "q", "item": "i", "probs": [0.2, 0.3, 0.5]}') + "\n")
    argv = [
        "distill",
        "student",
        "--pairs",
        str(pairs),
        "--teacher",
        str(teacher),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("darl-lite: error: ")
    assert str(pairs if teacher_line is None else teacher) in err
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------------
# HTTP API

MAX_ITEMS = 50
MAX_BODY = 1_100_000  # a 1 MB item fits, 1.2 MB does not


@pytest.fixture(scope="module")
def scorer(tiny_bundle_dir: Path) -> Scorer:
    return Scorer.load(tiny_bundle_dir, precision="fp32", session=SessionConfig(intra_op_threads=1))


@pytest.fixture(scope="module")
def base_url(scorer: Scorer) -> Iterator[str]:
    app = create_app(scorer, max_items=MAX_ITEMS, max_body_bytes=MAX_BODY)
    yield from serve_in_thread(app, log_level="critical")


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[Any]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def _post(client: Any, body: bytes) -> Any:
    return client.post("/score", content=body, headers={"Content-Type": "application/json"})


def _ok(response: Any, n: int) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == n
    for r in results:
        assert math.isclose(sum(r["probabilities"]), 1.0, abs_tol=1e-6)
        assert math.isfinite(r["ood_score"])
    return results


@pytest.mark.parametrize("name", sorted(ODD_TEXT))
def test_http_odd_text_is_scored_like_the_runtime_does(client: Any, scorer: Scorer, name: str) -> None:
    text = ODD_TEXT[name]
    for query, item in ((text, "Mapo doufu"), ("Szechwan cuisine", text)):
        got = _ok(client.post("/score", json={"query": query, "items": [item]}), 1)
        expected = asdict(scorer.score(query, [item])[0])
        assert {**got[0], "probabilities": tuple(got[0]["probabilities"])} == expected


def test_http_lone_surrogates_are_scored(client: Any) -> None:
    """As ``\\ud800`` escapes, or as UTF-8-encoded surrogates (``json.loads`` decodes bytes with
    ``surrogatepass``): both reach the runtime as lone surrogates, scored with U+FFFD in their place."""
    _ok(_post(client, b'{"query": "bad \\ud800 surrogate", "items": ["caf\\udce9"]}'), 1)
    _ok(_post(client, b'{"query": "q", "items": ["\xed\xa0\x80 surrogate"]}'), 1)


def test_http_one_megabyte_item_within_the_limit_is_scored_truncated(client: Any) -> None:
    (result,) = _ok(client.post("/score", json={"query": "q", "items": ["doufu " * 175_000]}), 1)
    assert result["truncated"] is True


def test_http_body_over_the_limit_is_413_before_parsing(client: Any) -> None:
    response = client.post("/score", json={"query": "q", "items": ["doufu " * 200_000]})
    assert response.status_code == 413
    assert f"limit of {MAX_BODY} bytes" in response.json()["detail"]
    # Not JSON at all, but too big: still 413, the body is never parsed.
    assert _post(client, b"\xff" * (MAX_BODY + 1)).status_code == 413


def test_http_item_count_limits(client: Any) -> None:
    _ok(client.post("/score", json={"query": "q", "items": ["a"] * MAX_ITEMS}), MAX_ITEMS)
    over = client.post("/score", json={"query": "q", "items": ["a"] * (MAX_ITEMS + 1)})
    assert over.status_code == 422 and f"limit of {MAX_ITEMS}" in over.json()["detail"]
    batch = {"requests": [{"query": "q", "items": ["a"] * 30}, {"query": "r", "items": ["b"] * 30}]}
    assert client.post("/score", json=batch).status_code == 422


def test_http_empty_lists_give_empty_results(client: Any) -> None:
    assert client.post("/score", json={"query": "q", "items": []}).json() == {"results": []}
    assert client.post("/score", json={"requests": []}).json() == {"results": []}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # empty and whitespace-only strings
        ({"query": "", "items": ["a"]}, "query is empty or whitespace only"),
        ({"query": " \t\n\u3000", "items": ["a"]}, "query is empty or whitespace only"),
        ({"query": "q", "items": ["a", ""]}, "items[1] is empty or whitespace only"),
        ({"query": "q", "items": ["\r\n"]}, "items[0] is empty or whitespace only"),
        # non-string values
        ({"query": 5, "items": ["a"]}, "query must be a string, got int"),
        ({"query": None, "items": ["a"]}, "query must be a string, got NoneType"),
        ({"query": ["q"], "items": ["a"]}, "query must be a string, got list"),
        ({"query": "q", "items": [None]}, "items[0] must be a string, got NoneType"),
        ({"query": "q", "items": ["a", True]}, "items[1] must be a string, got bool"),
        ({"query": "q", "items": [1.5]}, "items[0] must be a string, got float"),
        ({"query": "q", "items": [{"text": "a"}]}, "items[0] must be a string, got dict"),
        ({"query": "q", "items": [["a"]]}, "items[0] must be a string, got list"),
        ({"query": "q", "items": "a"}, "items must be a list of strings, got a single str"),
        ({"query": "q", "items": {"a": 1}}, "items must be a list of strings, got dict"),
        ({"query": "q", "items": None}, "items must be a list of strings, got NoneType"),
        ({"query": "q", "items": 3}, "items must be a list of strings, got int"),
        (
            {"requests": [{"query": "q", "items": ["a"]}, {"query": "r", "items": ["b", 7]}]},
            "requests[1].items[1] must be a string, got int",
        ),
        ({"requests": [{"query": "", "items": []}]}, "requests[0].query is empty"),
        ({"requests": "all"}, "requests must be a list of objects, got str"),
        ({"requests": [["q", ["a"]]]}, "requests[0] must be an object"),
        ({}, "missing fields ['items', 'query']"),
        ({"query": "q", "items": [], "token": "x"}, "unknown fields ['token']"),
    ],
)
def test_http_bad_fields_are_422_naming_the_field(client: Any, body: Any, message: str) -> None:
    response = client.post("/score", json=body)
    assert response.status_code == 422
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"   ", "not valid JSON"),
        (b'{"query": "q", "items": ["a"]', "not valid JSON"),
        (b"{'query': 'q', 'items': ['a']}", "not valid JSON"),
        (b'{"query": "q", "items": ["a",]}', "not valid JSON"),
        (b'{"query": "caf\xe9", "items": ["a"]}', "not valid JSON"),  # Latin-1, not UTF-8
        (b"\xff\xfe\x00", "not valid JSON"),
        (b'{"query": "q", "items": [NaN]}', "items[0] must be a string, got float"),
        (b'{"query": Infinity, "items": ["a"]}', "query must be a string, got float"),
        (b'"just a string"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
)
def test_http_undecodable_bodies_are_422(client: Any, body: bytes, message: str) -> None:
    response = _post(client, body)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_http_utf16_json_is_accepted(client: Any) -> None:
    """``json.loads`` detects UTF-16/32 from the first bytes (RFC 4627): a defined outcome, 200."""
    _ok(_post(client, json.dumps({"query": "四川", "items": ["麻婆豆腐"]}).encode("utf-16")), 1)


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"query": "q", "items": [' + b"9" * 5000 + b"]}"],
    ids=["nesting-100000-deep", "5000-digit-integer"],
)
def test_http_pathological_json_is_422_not_500(client: Any, body: bytes) -> None:
    response = _post(client, body)
    assert response.status_code == 422, response.text


def test_http_errors_never_echo_the_body(client: Any) -> None:
    secret = "sk-THIS-MUST-NOT-COME-BACK"
    for body in (
        {"query": secret, "items": [secret, 5]},
        {"query": " ", "items": [secret]},
        {"query": secret, "items": ["a"] * (MAX_ITEMS + 1)},
    ):
        response = client.post("/score", json=body, headers={"Authorization": f"Bearer {secret}"})
        assert response.status_code == 422
        assert secret not in response.text and len(response.content) < 300


def test_http_wrong_method_and_path(client: Any) -> None:
    assert client.get("/score").status_code == 405
    assert client.post("/nope", json={}).status_code == 404


# Hypothesis over the HTTP API: whatever arrives, the answer is 200, 413 or 422, never 500, and a
# 200 carries one valid result per item.

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_field = st.sampled_from(["query", "items", "requests"]) | st.text(max_size=6)
_bodies = st.one_of(
    st.fixed_dictionaries({"query": _json, "items": _json}),
    st.fixed_dictionaries(
        {"query": st.text(max_size=50), "items": st.lists(st.text(max_size=50), max_size=6)}
    ),
    st.fixed_dictionaries(
        {
            "requests": st.lists(
                st.fixed_dictionaries({"query": st.text(max_size=30), "items": st.lists(_json, max_size=4)}),
                max_size=3,
            )
        }
    ),
    st.dictionaries(_field, _json, max_size=4),
    _json,
)
_HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _expected_items(body: Any) -> list[int] | None:
    """Items per query if the body is valid, else None."""

    def valid(query: Any, items: Any) -> bool:
        texts = [query, *items] if isinstance(items, list) else [None]
        return all(isinstance(t, str) and t.strip() for t in texts)

    if not isinstance(body, dict):
        return None
    if set(body) == {"query", "items"}:
        return [len(body["items"])] if valid(body["query"], body["items"]) else None
    if set(body) == {"requests"} and isinstance(body["requests"], list):
        reqs = body["requests"]
        ok = all(
            isinstance(r, dict) and set(r) == {"query", "items"} and valid(r["query"], r["items"])
            for r in reqs
        )
        return [len(r["items"]) for r in reqs] if ok else None
    return None


@_HYPOTHESIS
@given(body=_bodies)
def test_http_any_json_body_gets_200_or_422(client: Any, body: Any) -> None:
    raw = json.dumps(body).encode("ascii")  # \u escapes: lone surrogates arrive as such
    response = _post(client, raw)
    expected = _expected_items(body)
    if expected is None or sum(expected) > MAX_ITEMS:
        assert response.status_code == 422, (body, response.text)
        assert response.json()["detail"]
        return
    assert response.status_code == 200, (body, response.text)
    results = response.json()["results"]
    groups = results if "requests" in body else [results]
    assert [len(g) for g in groups] == expected
    for group in groups:
        for r in group:
            assert math.isclose(sum(r["probabilities"]), 1.0, abs_tol=1e-6)


@_HYPOTHESIS
@given(body=st.binary(max_size=300))
def test_http_any_bytes_get_a_defined_answer(client: Any, body: bytes) -> None:
    response = _post(client, body)
    assert response.status_code in (200, 422), response.text
