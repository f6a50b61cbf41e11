"""``darl-lite export``: a trained student to a verified int8 bundle (calibration, OOD, shift routing)."""

from __future__ import annotations

import argparse
from typing import Any

from darl_lite.cli_options import add_fold_option


def register(sub: Any) -> None:
    export = sub.add_parser("export", allow_abbrev=False, help="export a trained student to a bundle")
    export.add_argument("student", help="saved student folder (from `darl-lite distill student`)")
    export.add_argument("--out", required=True, help="bundle folder to write")
    add_fold_option(export)
    export.add_argument("--max-length", type=int, default=64)
    export.add_argument(
        "--preset",
        default="auto",
        choices=["auto", "avx2", "avx512_vnni", "arm64"],
        help="int8 kernel family",
    )
    export.add_argument(
        "--quant-mode",
        default="auto",
        choices=["auto", "static", "dynamic"],
        help="int8 activation scales: fixed from training pairs (static) or per batch (dynamic); "
        "auto = static on avx512_vnni and avx2 (measured faster and closer to fp32 there), else dynamic",
    )
    gate = "parity gate"
    export.add_argument("--min-agreement", type=float, help=f"{gate}: int8/fp32 grade argmax agreement")
    export.add_argument("--min-spearman", type=float, help=f"{gate}: Spearman of expected relevance")
    export.add_argument("--min-ndcg-retention", type=float, help=f"{gate}: NDCG@10 int8 / fp32")
    export.add_argument("--max-macro-f1-drop", type=float, help=f"{gate}: macro-F1 drop in points")
    export.add_argument(
        "--max-sensitive-exclusions",
        type=int,
        default=8,
        help="keep at most this many quantization-sensitive nodes fp32 to pass the gate",
    )
    export.add_argument(
        "--route-rate", type=float, default=0.10, help="share of in-distribution dev pairs the router sends"
    )
    export.add_argument(
        "--allow-parity-failure", action="store_true", help="write the bundle even if parity fails"
    )
    export.add_argument(
        "--no-fuse",
        action="store_true",
        help="quantize the plain graph, without onnxruntime's fused attention (see darl_lite.export.fuse)",
    )
    export.add_argument(
        "--no-first-token",
        action="store_true",
        help="run the int8 graph's last layer on every token, not only on the first token the head "
        "reads (see darl_lite.export.first_token)",
    )
    export.add_argument(
        "--teacher",
        default=None,
        help="teacher file grading dev + ood_dev, for the shift evidence (default: the shipped one)",
    )
    export.add_argument(
        "--no-shift",
        action="store_true",
        help="write no query-level shift routing (see darl_lite.shift_routing)",
    )
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from darl_lite.datasets import load_dbpedia
    from darl_lite.export.build import ExportConfig, build_bundle
    from darl_lite.export.parity import ParityThresholds

    splits = load_dbpedia(fold=args.fold)
    gate = {
        "min_argmax_agreement": args.min_agreement,
        "min_spearman": args.min_spearman,
        "min_ndcg_retention": args.min_ndcg_retention,
        "max_macro_f1_drop": args.max_macro_f1_drop,
    }
    config = ExportConfig(
        max_length=args.max_length,
        preset=args.preset,
        thresholds=ParityThresholds(**{k: v for k, v in gate.items() if v is not None}),
        allow_parity_failure=args.allow_parity_failure,
        max_sensitive_exclusions=args.max_sensitive_exclusions,
        route_rate=args.route_rate,
        fuse_attention=not args.no_fuse,
        first_token_last_layer=not args.no_first_token,
        quant_mode=args.quant_mode,
    )
    bundle = build_bundle(
        args.student,
        args.out,
        train_pairs=splits.train,
        dev_pairs=splits.dev,
        parity_pairs=[*splits.dev, *splits.ood_dev],
        config=config,
        overwrite=args.overwrite,
    )
    if not args.no_shift:
        from darl_lite.cascade_fit import fit_pool_kind
        from darl_lite.teacher_file import FileTeacher, shipped_teacher_path

        bundle = fit_pool_kind(
            bundle,
            name="ood_train pool",
            train_queries=[p.query for p in splits.train],
            pool_queries=[p.query for p in splits.ood_train],
            dev_pairs=list(splits.dev),
            shifted_dev_pairs=list(splits.ood_dev),
            teacher=FileTeacher.from_file(args.teacher or shipped_teacher_path()),
        )
    print(f"bundle written to {bundle.directory}")
    return 0
