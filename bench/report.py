"""Turn one run's raw outputs into ``results.json``, ``report.md`` and the plots.

    python -m bench.report --out bench/results

Reads from ``--out``: ``latency_t*.json`` (pytest-benchmark, raw timings included), ``gemm_t*.json``,
``tokens.json``, ``memory.json``, ``quality.json`` (+ ``.npz``), ``profile.json``, ``run.json``. Every
ratio is computed here from medians of the same run: throughput = pairs / median seconds of a
request; overhead = darl-lite median / raw-session median − 1; fraction of peak = useful GFLOPs of
the request (actual token lengths, :func:`bench.common.EncoderShape.flops`) per median second over
the best measured GEMM throughput of the contender's precision at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CONTENDERS

TARGETS = {
    "speedup_vs_st_torch": 3.0,
    "overhead_vs_raw": 0.10,
    "ndcg_int8_vs_fp32": 0.99,
    "peak_rss_mb": 200.0,
    "import_s": 0.3,
}


#: Contenders that run the bundle's int8 graph.
INT8_GRAPH_CONTENDERS = frozenset({"darl_int8", "raw_int8"})


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def pooled_cases(out: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    """``(contender, threads, items)`` → the timed calls of all of that case's blocks pooled
    (``data``, seconds) and each block's median (``block_medians_s``, in block order)."""
    blocks: dict[tuple[str, int, int], list[tuple[int, np.ndarray]]] = {}
    for path in sorted(out.glob("latency_t*.json")):
        for b in json.loads(path.read_text())["benchmarks"]:
            info = b["extra_info"]
            data = np.asarray(b["stats"].get("data") or [b["stats"]["median"]])
            key = (info["contender"], int(info["threads"]), int(info["pairs"]))
            blocks.setdefault(key, []).append((int(info.get("block", 0)), data))
    cases = {}
    for key, parts in blocks.items():
        in_order = [data for _, data in sorted(parts, key=lambda p: p[0])]
        cases[key] = {
            "data": np.concatenate(in_order),
            "block_medians_s": [float(np.median(data)) for data in in_order],
        }
    return cases


def latency_rows(out: Path, tokens: dict, gemm: dict) -> list[dict]:
    rows = []
    for (name, threads, n), case in pooled_cases(out).items():
        data = case["data"]
        median = float(np.median(data))
        precision = CONTENDERS[name][1]
        # the work the contender's own graph does: the bundle's int8 graph may skip the last
        # layer's rows the head never reads (darl_lite.export.first_token)
        size = tokens[str(n)]
        own = name in INT8_GRAPH_CONTENDERS and "int8_graph_gflop" in size
        gflop = size["int8_graph_gflop"] if own else size["useful_gflop"]
        peak = gemm.get(str(threads), {}).get("peak_gops", {}).get(precision)
        theory = gemm.get(str(threads), {}).get("theoretical_peak_gops", {}).get(precision)
        rows.append(
            {
                "contender": name,
                "threads": threads,
                "items": n,
                "rounds": len(data),
                "blocks": len(case["block_medians_s"]),
                "block_medians_s": case["block_medians_s"],
                "median_s": median,
                "p50_ms": 1e3 * float(np.percentile(data, 50)),
                "p99_ms": 1e3 * float(np.percentile(data, 99)),
                "pairs_per_s": n / median,
                "gops": gflop / median,
                "fraction_of_peak": (gflop / median) / peak if peak else None,
                # against cores x clock x MACs per cycle of the CPU's ISA (bench/peak.py): the
                # measured GEMM peak can read low when its short probe hits a slow moment
                "fraction_of_theoretical_peak": (gflop / median) / theory if theory else None,
            }
        )
    index = {(r["contender"], r["threads"], r["items"]): r for r in rows}
    for r in rows:
        key = (r["threads"], r["items"])
        st = index.get(("st_torch", *key))
        raw = index.get(("raw_int8", *key))
        r["x_vs_st_torch"] = r["pairs_per_s"] / st["pairs_per_s"] if st else None
        darl = r["contender"].startswith("darl")
        r["overhead_vs_raw"] = r["median_s"] / raw["median_s"] - 1.0 if raw and darl else None
    return rows


def block_ratios(rows: list[dict], threads: int, items: int, over: str, under: str) -> list[float]:
    """Per block, ``under``'s median time over ``over``'s (how many times faster ``over`` ran), for
    a case both were timed in with the same number of blocks; empty otherwise."""
    pick = {x["contender"]: x for x in rows if (x["threads"], x["items"]) == (threads, items)}
    if over not in pick or under not in pick:
        return []
    mine, theirs = pick[over]["block_medians_s"], pick[under]["block_medians_s"]
    if len(mine) != len(theirs):
        return []
    return [b / a for a, b in zip(mine, theirs, strict=True)]


def _block_ratio_lines(rows: list[dict], threads: int, items: int) -> list[str]:
    ratios = block_ratios(rows, threads, items, "darl_int8", "st_onnx_int8")
    if len(ratios) < 2:
        return []
    shown = ", ".join(f"{x:.2f}" for x in ratios)
    median = float(np.median(ratios))
    return [f"darl-lite int8 × ST int8 export, block by block: {shown}× (median {median:.2f}×).", ""]


def _pct(fraction: float | None) -> str:
    return _fmt(None if fraction is None else 100 * fraction, ".1f")


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def plot_latency(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.8), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], threads, strict=True):
        for name, (label, _) in CONTENDERS.items():
            pts = sorted(
                (r["items"], r["pairs_per_s"]) for r in rows if r["threads"] == t and r["contender"] == name
            )
            if pts:
                style = ":" if "_int8_" in name and name.startswith("darl") else "-"
                style = style if name.startswith(("darl", "raw")) else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items per query (one request)")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("throughput (pairs / s, median request)")
    axes[0][-1].legend(fontsize=7.5, loc="lower right")
    fig.suptitle("Latency suite: same weights, same pairs, same thread budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_route_curve(quality: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    splits = list(quality["route_curve"])
    fig, axes = plt.subplots(2, len(splits), figsize=(6.2 * len(splits), 7.5), squeeze=False)
    for col, split in enumerate(splits):
        curve = quality["route_curve"][split]
        rates = [100 * row["route_rate"] for row in curve]
        for row_i, metric in enumerate(("macro_f1", "ndcg@10")):
            ax = axes[row_i][col]
            ax.plot(
                rates,
                [r["router"][metric] for r in curve],
                "-o",
                label="router (the node's per-pair urgency)",
            )
            ax.plot(rates, [r["random"][metric] for r in curve], "--s", label="random routing (control)")
            teacher = quality["metrics"]["teacher"][split][metric]
            fp32 = quality["metrics"]["student_fp32"][split][metric]
            ax.axhline(teacher, color="grey", linestyle=":", label="teacher alone")
            ax.axhline(fp32, color="tab:green", linestyle="-.", linewidth=1, label="student fp32 alone")
            ax.set_xlabel("share of pairs routed to the teacher (%)")
            ax.set_ylabel(metric)
            ax.set_title(f"{split}: {metric}")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Cascade quality against route rate (int8 student → teacher)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(quality: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    models = [m for m in ("teacher", "student_fp32", "student_int8") if m in quality["reliability"]]
    splits = list(quality["reliability"][models[0]])
    fig, axes = plt.subplots(1, len(splits), figsize=(5.6 * len(splits), 5), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        for m in models:
            b = quality["reliability"][m][split]
            keep = [i for i, c in enumerate(b["count"]) if c >= 10]
            ece = quality["metrics"][m][split]["ece"]
            ax.plot(
                [b["confidence"][i] for i in keep],
                [b["accuracy"][i] for i in keep],
                "-o",
                markersize=4,
                label=f"{m} (ECE {ece:.3f})",
            )
        ax.set_xlim(0.3, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("confidence (max probability; bins with ≥ 10 pairs)")
        ax.set_ylabel("accuracy of the predicted grade")
        ax.set_title(split)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Reliability diagram (15 equal-width bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ood(quality: dict, arrays: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, p in zip(axes, ("int8", "fp32"), strict=True):
        id_s, ood_s = arrays[f"ood_{p}_id_test"], arrays[f"ood_{p}_ood_test"]
        both = np.concatenate([id_s, ood_s])
        bins = np.logspace(np.log10(max(both.min(), 1.0)), np.log10(both.max()), 60)
        for scores, split in ((id_s, "id_test"), (ood_s, "ood_test")):
            weights = np.full(len(scores), 1.0 / len(scores))
            ax.hist(scores, bins=bins, weights=weights, alpha=0.55, label=f"{split} ({len(scores):,} pairs)")
        d = quality["ood_detection"][p]
        ax.axvline(d["threshold"], color="k", linestyle="--", label="bundle threshold (95% of dev ID)")
        ax.set_xscale("log")
        ax.set_xlabel("Mahalanobis OOD score (log scale)")
        ax.set_ylabel("share of the split's pairs per bin")
        ax.set_title(f"{p}: AUROC {d['auroc']:.3f}, FPR@95%TPR {d['fpr_at_95_tpr']:.3f}")
        ax.legend(fontsize=8)
    fig.suptitle("OOD score (Mahalanobis on the pooled representation): id_test vs ood_test")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build(out: Path) -> dict:
    run = _load(out / "run.json") or {}
    tokens = _load(out / "tokens.json") or {}
    gemm = {str(g["threads"]): g for g in (_load(p) for p in sorted(out.glob("gemm_t*.json")))}
    rows = latency_rows(out, tokens, gemm) if tokens else []
    memory = _load(out / "memory.json")
    quality = _load(out / "quality.json")
    profile = _load(out / "profile.json")
    index = {(r["contender"], r["threads"], r["items"]): r for r in rows}
    headline: dict[str, Any] = {}
    key_int8 = ("darl_int8", 2, 100)
    if key_int8 in index:
        d = index[key_int8]
        st_q = index.get(("st_onnx_int8", 2, 100))
        headline = {
            "darl_int8_pairs_per_s": d["pairs_per_s"],
            "x_vs_st_torch": d["x_vs_st_torch"],
            "x_vs_st_onnx_int8": d["pairs_per_s"] / st_q["pairs_per_s"] if st_q else None,
            "overhead_vs_raw": d["overhead_vs_raw"],
            "fraction_of_int8_peak": d["fraction_of_peak"],
            "int8_peak_gops": gemm.get("2", {}).get("peak_gops", {}).get("int8"),
            "fraction_of_theoretical_int8_peak": d.get("fraction_of_theoretical_peak"),
            "theoretical_int8_peak_gops": gemm.get("2", {}).get("theoretical_peak_gops", {}).get("int8"),
        }
    targets: dict[str, Any] = {}
    significant: dict[str, bool] = {}
    if headline:
        targets["speedup_vs_st_torch"] = (headline["x_vs_st_torch"], headline["x_vs_st_torch"] >= 3.0)
        targets["overhead_vs_raw"] = (headline["overhead_vs_raw"], headline["overhead_vs_raw"] <= 0.10)
    if quality:
        ratios = {
            s: quality["metrics"]["student_int8"][s]["ndcg@10"]
            / quality["metrics"]["student_fp32"][s]["ndcg@10"]
            for s in quality["metrics"]["student_int8"]
        }
        targets["ndcg_int8_vs_fp32"] = (ratios, all(v >= 0.99 for v in ratios.values()))
        # Whether each int8 - fp32 gap is distinguishable from zero on these test queries at all.
        gaps = quality.get("int8_vs_fp32_ndcg", {})
        significant = {s: not (g["ci95"][0] <= 0.0 <= g["ci95"][1]) for s, g in gaps.items()}
    if memory:
        for mode in ("per_query", "one_call"):
            peak = next(
                r["peak_rss_mb"] for r in memory["rss"] if (r["precision"], r["mode"]) == ("int8", mode)
            )
            targets[f"peak_rss_mb_{mode}"] = (peak, peak <= 200.0)
        targets["import_s"] = (memory["import"]["median_s"], memory["import"]["median_s"] <= 0.3)
    results = {
        "run": run,
        "headline": headline,
        "targets": {k: {"value": v, "met": met} for k, (v, met) in targets.items()},
        "ndcg_gap_significant": significant,
        "latency": rows,
        "tokens": tokens,
        "gemm": gemm,
        "memory": memory,
        "quality": quality,
        "profile": profile,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if rows:
        plot_latency(rows, out / "latency.png")
    if quality:
        plot_route_curve(quality, out / "quality_vs_route_rate.png")
        plot_reliability(quality, out / "reliability.png")
        arrays = dict(np.load(out / "quality.npz"))
        plot_ood(quality, arrays, out / "ood_hist.png")
    (out / "report.md").write_text(render(results))
    return results


def render(r: dict) -> str:
    lines = ["# darl-lite benchmark report", ""]
    run = r["run"]
    if run:
        lines += [
            f"Command: `{run.get('command', '')}`  ",
            f"Started {run.get('started')}, {run.get('wall_s', 0) / 60:.1f} min wall; "
            f"load average (1 min) before: {run.get('load_before')}, after: {run.get('load_after')}; "
            f"by stage: {run.get('load_by_stage')}; latency passes: {run.get('load_latency_pass')}.  ",
            f"Machine: {run.get('machine')}.",
            "",
        ]
    h = r["headline"]
    if h:
        lines += [
            "## Headline (2 threads, 100 items per query)",
            "",
            "| figure | value |",
            "|---|---|",
            f"| darl-lite int8 throughput | {h['darl_int8_pairs_per_s']:.0f} pairs/s |",
            f"| × sentence-transformers torch fp32 | {_fmt(h['x_vs_st_torch'], '.2f')}× |",
            f"| × sentence-transformers ONNX dynamic-quantized | {_fmt(h['x_vs_st_onnx_int8'], '.2f')}× |",
            f"| runtime overhead over the raw session | {100 * h['overhead_vs_raw']:+.1f}% |",
            f"| fraction of the measured int8 GEMM peak ({_fmt(h['int8_peak_gops'], '.0f')} GOPS) | "
            f"{100 * h['fraction_of_int8_peak']:.1f}% |",
            f"| fraction of the theoretical int8 peak ({_fmt(h.get('theoretical_int8_peak_gops'), '.0f')} "
            f"GOPS) | {_pct(h.get('fraction_of_theoretical_int8_peak'))}% |",
        ]
        lines.append("")
    if r["targets"]:
        lines += ["## Targets", "", "| target | measured | met? |", "|---|---|---|"]
        t = r["targets"]
        names = {
            "speedup_vs_st_torch": "≥ 3× ST torch fp32 (100 items, 2 threads)",
            "overhead_vs_raw": "overhead ≤ 10% over the raw session (100 items, 2 threads)",
            "ndcg_int8_vs_fp32": "int8 NDCG@10 within 1% of fp32",
            "peak_rss_mb_per_query": "peak RSS ≤ 200 MB (int8, 10,000 pairs, one call per query)",
            "peak_rss_mb_one_call": "peak RSS ≤ 200 MB (int8, 10,000 pairs in one call)",
            "import_s": "`import darl_lite` ≤ 0.3 s",
        }
        for k, v in t.items():
            value = v["value"]
            if k == "speedup_vs_st_torch":
                shown = f"{value:.2f}×"
            elif k == "overhead_vs_raw":
                shown = f"{100 * value:+.1f}%"
            elif k == "ndcg_int8_vs_fp32":
                shown = ", ".join(f"{s} {100 * x:.1f}%" for s, x in value.items())
            elif k.startswith("peak_rss_mb"):
                shown = f"{value:.0f} MB"
            else:
                shown = f"{value:.3f} s"
            verdict = "**met**" if v["met"] else "**missed**"
            if k == "ndcg_int8_vs_fp32" and not v["met"]:
                unresolved = [s for s, sig in r.get("ndcg_gap_significant", {}).items() if not sig]
                if unresolved:
                    verdict += (
                        f" on the point estimate; the gap is within noise on {', '.join(unresolved)} "
                        "(95% CI over queries includes 0, see Quality)"
                    )
            lines.append(f"| {names[k]} | {shown} | {verdict} |")
        lines.append("")
    if r["latency"]:
        lines += [
            "## Latency",
            "",
            "One request = one query with N items. p50/p99 over the rounds of that case (few rounds at",
            "1000 items: p99 there is close to the maximum). GOPS = GFLOPs of the contender's own graph",
            "(actual token lengths; the bundle's int8 graph skips the last layer's rows after attention",
            "that the head never reads, where its manifest says so) per second; % peak against the",
            "best measured GEMM of the contender's precision, same threads (above 100%: that short",
            "GEMM probe ran in a slow moment); % theor. against the CPU's",
            "theoretical peak (cores × clock × MACs per cycle of its ISA, bench/peak.py), at the highest",
            "clock any of the run's GEMM probes implies when the reported one is lower (under a",
            "hypervisor the boost clock is hidden and moves: % theor. is then an upper bound).",
            "Where a case was timed in several blocks (`bench.run --blocks`), its rounds pool them all;",
            "the blocks of all contenders took turns, so each contender's rounds span the same minutes.",
            "",
        ]
        for t in sorted({x["threads"] for x in r["latency"]}):
            for n in sorted({x["items"] for x in r["latency"]}):
                tok = r["tokens"][str(n)]
                lines += [
                    f"### {t} thread{'s' if t > 1 else ''}, {n} items per query "
                    f"(mean {tok['mean_tokens']:.1f} tokens/pair, {tok['useful_gflop']:.2f} GFLOP)",
                    "",
                    "| contender | pairs/s | p50 ms | p99 ms | rounds | × ST torch | vs raw | GOPS | % peak "
                    "| % theor. |",
                    "|---|---|---|---|---|---|---|---|---|---|",
                ]
                for name, (label, _) in CONTENDERS.items():
                    x = next(
                        (
                            y
                            for y in r["latency"]
                            if (y["contender"], y["threads"], y["items"]) == (name, t, n)
                        ),
                        None,
                    )
                    if x is None:
                        continue
                    over = x["overhead_vs_raw"]
                    lines.append(
                        f"| {label} | {x['pairs_per_s']:.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | "
                        f"{x['rounds']} | {_fmt(x['x_vs_st_torch'], '.2f')}× | "
                        f"{'–' if over is None else f'{100 * over:+.0f}%'} | {x['gops']:.0f} | "
                        f"{_pct(x['fraction_of_peak'])} | "
                        f"{_pct(x.get('fraction_of_theoretical_peak'))} |"
                    )
                lines.append("")
                lines += _block_ratio_lines(r["latency"], t, n)
        lines += ["![latency](latency.png)", ""]
    if r["gemm"]:
        lines += ["## Cost model: measured GEMM throughput (GOPS)", ""]
        lines += ["| threads | kernel | M×K×N | GOPS |", "|---|---|---|---|"]
        for t, g in sorted(r["gemm"].items()):
            for row in g["rows"]:
                lines.append(
                    f"| {t} | {row['kernel']} | {row['m']}×{row['k']}×{row['n']} | {row['gops']:.0f} |"
                )
        lines.append("")
        for t, g in sorted(r["gemm"].items()):
            lines.append(
                f"- {t} thread(s): fp32 peak {g['peak_gops']['fp32']:.0f} GFLOPS, int8 peak "
                "(best of the kernels the graphs run: dynamic, static-to-float) "
                f"{g['peak_gops']['int8']:.0f} GOPS, "
                "bare u8×s8 kernel "
                f"{g['peak_gops_static_int8']:.0f} GOPS."
            )
        lines.append("")
    if r["tokens"]:
        lines += [
            "| items | mean tokens/pair | max | useful GFLOP/request | the int8 graph's GFLOP "
            "| executed GFLOP (padded batches) |"
        ]
        lines += ["|---|---|---|---|---|---|"]
        for n, tok in r["tokens"].items():
            own = tok.get("int8_graph_gflop", tok["useful_gflop"])
            lines.append(
                f"| {n} | {tok['mean_tokens']:.1f} | {tok['max_tokens']} | {tok['useful_gflop']:.3f} | "
                f"{own:.3f} | {tok['executed_gflop']:.3f} |"
            )
        lines.append("")
    m = r["memory"]
    if m:
        lines += [
            f"## Memory and start-up ({m['pairs']:,} pairs, {m['queries']} queries, {m['threads']} threads)",
            "",
            "| precision | traffic | RSS after import | after load | peak RSS | scoring time |",
            "|---|---|---|---|---|---|",
        ]
        for x in m["rss"]:
            lines.append(
                f"| {x['precision']} | {x['mode'].replace('_', ' ')} | {x['rss_after_import_mb']:.0f} MB | "
                f"{x['rss_after_load_mb']:.0f} MB | **{x['peak_rss_mb']:.0f} MB** | {x['score_s']:.1f} s |"
            )
        imp, load = m["import"], m["load"]
        lines += [
            "",
            f"- `import darl_lite`: median **{imp['median_s']:.3f} s** over {len(imp['runs_s'])} "
            "fresh processes; "
            f"torch imported: {imp['torch_imported']}. Heaviest top-level imports: "
            + ", ".join(f"{x['module']} {x['cum_ms']:.0f} ms" for x in imp["slowest_modules"][:6])
            + ".",
            f"- Bundle load (median, warm page cache): `load_bundle` with sha256 verification "
            f"{load['load_bundle_verify_s']:.3f} s, without {load['load_bundle_noverify_s']:.3f} s; "
            f"`Scorer` construction int8 {load['scorer_int8_s']:.3f} s, fp32 {load['scorer_fp32_s']:.3f} s.",
            "",
        ]
    q = r["quality"]
    if q:
        lines += [
            f"## Quality (id_test {q['splits']['id_test']:,} pairs, "
            f"ood_test {q['splits']['ood_test']:,} pairs)",
            "",
            "| model | split | macro-F1 | F1 irrelevant | F1 weak | F1 strong | accuracy | NDCG@10 | ECE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for model, by_split in q["metrics"].items():
            for split, x in by_split.items():
                f1 = x["per_grade_f1"]
                lines.append(
                    f"| {model} | {split} | {x['macro_f1']:.3f} | "
                    + " | ".join(f"{v:.3f}" for v in f1.values())
                    + f" | {x['accuracy']:.3f} | {x['ndcg@10']:.3f} | {x['ece']:.3f} |"
                )
        cd = q["cascade_default"]
        lines += [
            "",
            f"cascade_default = the int8 scorer with the teacher as fallback and the bundle's own policy "
            f"(rule {cd['policy']['rule']}, at most {cd['policy']['max_route_fraction']:.0%} of a call): "
            + ", ".join(f"{s} routed {v:.1%}" for s, v in cd["route_rate"].items())
            + ". st_onnx_int8 = ST's own dynamic-quantized export of the same student, with the bundle's "
            "temperature.",
            "",
        ]
        for split, gap in q["int8_vs_fp32_ndcg"].items():
            lines.append(
                f"- int8 − fp32 NDCG@10 on {split}: {gap['mean_diff']:+.4f} "
                f"(95% paired bootstrap over {gap['queries']} queries: "
                f"[{gap['ci95'][0]:+.4f}, {gap['ci95'][1]:+.4f}])."
            )
        for p, d in q["ood_detection"].items():
            lines.append(
                f"- OOD detection ({p}): AUROC {d['auroc']:.3f}, FPR@95%TPR {d['fpr_at_95_tpr']:.3f}."
            )
        if q.get("parity_st_torch_vs_darl_fp32"):
            par = q["parity_st_torch_vs_darl_fp32"]
            lines.append(
                f"- Same weights: ST torch vs darl-lite fp32 logits, max |diff| "
                f"{par['max_abs_logit_diff']:.1e} over {par['pairs']} pairs."
            )
        lines += [
            "",
            f"### Quality against route rate (router vs random, mean of {q['route_curve_repeats']} draws)",
            "",
        ]
        lines += [
            "| split | route rate | router macro-F1 | random macro-F1 | router NDCG@10 | random NDCG@10 |",
            "|---|---|---|---|---|---|",
        ]
        for split, curve in q["route_curve"].items():
            for row in curve:
                lines.append(
                    f"| {split} | {row['route_rate']:.0%} | {row['router']['macro_f1']:.3f} | "
                    f"{row['random']['macro_f1']:.3f} | {row['router']['ndcg@10']:.3f} | "
                    f"{row['random']['ndcg@10']:.3f} |"
                )
        lines += [
            "",
            "![quality vs route rate](quality_vs_route_rate.png)",
            "",
            "![reliability](reliability.png)",
            "",
            "![OOD score histograms](ood_hist.png)",
            "",
        ]
    p = r["profile"]
    if p:
        total = p["score_median_s"]
        lines += [
            f"## Profile of `Scorer.score` ({p['items']} items, {p['threads']} threads, int8, "
            f"median of {p['reps']})",
            "",
            f"`score` median {1e3 * total:.1f} ms; raw session on the same batches "
            f"{1e3 * p['raw_session_median_s']:.1f} ms.",
            "",
            "| stage | median ms |",
            "|---|---|",
        ]
        for k, v in p["stages_median_s"].items():
            lines.append(f"| {k} | {1e3 * v:.2f} |")
        lines += ["", "| prototype / condition | median ms |", "|---|---|"]
        for k, v in p["alternatives"].items():
            if isinstance(v, dict):
                for bs, s in v.items():
                    lines.append(f"| {k} = {bs} | {1e3 * s:.1f} |")
            elif k.endswith("_s"):
                lines.append(f"| {k[:-2]} | {1e3 * v:.3f} |")
            else:
                lines.append(f"| {k} | {v:.2e} |")
        lines += ["", "| function (cProfile, by own time) | calls/score | own ms/score | cum ms/score |"]
        lines += ["|---|---|---|---|"]
        for x in p["cprofile_top"][:10]:
            lines.append(
                f"| `{x['function']}` | {x['calls_per_score']:.0f} | {x['tottime_ms_per_score']:.2f} | "
                f"{x['cumtime_ms_per_score']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    build(args.out)


if __name__ == "__main__":
    main()
