"""scxnn-node: command line of the node."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

from scxnn_node.config import ConfigError, load_config
from scxnn_node.imaging.decode import ImageRejected
from scxnn_node.model.bundle import NOT_FOR_CLINICAL_USE, BundleError, load_bundle, verify_bundle
from scxnn_node.model.engine import BACKENDS, PRECISIONS, EngineOptions, InferenceEngine
from scxnn_node.model.result import StudyResult
from scxnn_node.triage import PreparedInstance, prepare_instance, triage_study

log = logging.getLogger("scxnn_node")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scxnn-node", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default)")
    sub = parser.add_subparsers(dest="command", required=True)

    infer = sub.add_parser("infer", help="triage DICOM files (grouped by study) with a bundle")
    infer.add_argument("paths", nargs="+", type=Path, help="DICOM files or directories")
    infer.add_argument("--config", type=Path, help="config.yaml (model and filters sections)")
    infer.add_argument("--bundle", type=Path, help="bundle directory (overrides the config)")
    infer.add_argument("--json", action="store_true", help="print the results as JSON")
    infer.add_argument("--device", help="cpu or cuda:N (default: the config's first device)")
    infer.add_argument("--batch-size", type=int, default=None)
    infer.add_argument("--precision", choices=PRECISIONS, default=None)
    infer.add_argument("--backend", choices=BACKENDS, default=None, help="default: eager")
    infer.add_argument(
        "--body-part",
        action="append",
        dest="body_parts",
        metavar="PART",
        help="allowed Body Part Examined (repeatable; default CHEST and empty)",
    )

    bundle = sub.add_parser("bundle", help="inspect model bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    verify = bsub.add_parser("verify", help="check a bundle's format and every hash")
    verify.add_argument("dir", type=Path)
    show = bsub.add_parser("show", help="print a bundle's manifest summary")
    show.add_argument("dir", type=Path)
    show.add_argument("--json", action="store_true")
    return parser


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def _format_result(result: StudyResult) -> str:
    uid = result.study_instance_uid
    line = f"{uid}  {result.verdict.value.upper()}"
    if result.risk_tier:
        line += f"  tier={result.risk_tier}"
    if result.abnormality_score is not None:
        line += f"  score={result.abnormality_score:.3f} (threshold {result.threshold:.3f})"
    flagged = ", ".join(
        f"{f.name} {f.probabilities['target']:.2f}" for f in result.flagged_findings[:5]
    )
    if flagged:
        line += f"  flagged: {flagged}"
    if result.reason:
        line += f"  [{result.reason}]"
    if result.bundle.demo:
        line += f"  ({NOT_FOR_CLINICAL_USE})"
    return line


def _infer(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"scxnn-node: {exc}", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.bundle or config.model.bundle)
    except BundleError as exc:
        print(f"scxnn-node: bundle refused: {exc}", file=sys.stderr)
        return 2
    policy = config.selection_policy(args.body_parts)
    spec = bundle.manifest.preprocessing
    studies: dict[str, list[PreparedInstance]] = defaultdict(list)
    failed = 0
    for path in _expand(args.paths):
        try:
            prepared = prepare_instance(path, spec, policy)
        except ImageRejected as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        except OSError as exc:
            print(f"{path}: cannot read file: {exc.strerror}", file=sys.stderr)
            failed += 1
            continue
        studies[prepared.study_instance_uid].append(prepared)
    results: list[StudyResult] = []
    if studies:
        engine = InferenceEngine(
            bundle,
            EngineOptions(
                device=args.device or config.model.devices[0],
                batch_size=args.batch_size or config.model.batch_size,
                precision=args.precision or config.model.precision,
                backend=args.backend or config.model.backend,
            ),
        )
        results = [triage_study(engine, uid, items) for uid, items in studies.items()]
    if args.json:
        print(json.dumps({"studies": [r.to_dict() for r in results]}, indent=2))
    else:
        for result in results:
            print(_format_result(result))
    return 1 if failed else 0


def _bundle(args: argparse.Namespace) -> int:
    try:
        manifest = verify_bundle(args.dir)
    except BundleError as exc:
        print(f"bundle {args.dir} is NOT intact: {exc}", file=sys.stderr)
        return 1
    if args.bundle_command == "verify":
        print(
            f"bundle {args.dir} is intact: {manifest.name} {manifest.version}, "
            f"{len(manifest.files)} files verified"
        )
        return 0
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return 0
    op = manifest.operating_point
    print(f"name:          {manifest.name}")
    print(
        f"version:       {manifest.version}"
        + (f"  ({NOT_FOR_CLINICAL_USE}: demo)" if manifest.demo else "")
    )
    print(f"created:       {manifest.created}")
    print(f"architecture:  {manifest.architecture}, input {manifest.preprocessing.size} px")
    print(f"intended use:  {manifest.intended_use}")
    print(f"operating pt:  threshold {op.threshold:.4f} for sensitivity {op.target_sensitivity}")
    for key, value in sorted(op.validation.items()):
        print(f"  validation {key}: {value}")
    print(f"training data: {manifest.training_data.description[:100]}")
    print(f"findings ({len(manifest.findings)}):")
    for f in manifest.findings:
        print(f"  {f.name:<24} {f.tier.value:<13} {f.code.scheme}:{f.code.value}")
    for line in manifest.changelog:
        print(f"changelog:     {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if args.command == "infer":
        return _infer(args)
    return _bundle(args)


if __name__ == "__main__":
    sys.exit(main())
