"""scxnn-node: command line of the node."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

# Only light modules at the top: status, jobs, deliveries, echo, audit, check-config and
# --help must not pay for torch (seconds of CPU on a busy node); the commands that run the
# model import it.
from scxnn_node.config import ConfigError, NodeConfig, load_config
from scxnn_node.logs import configure_logging, redact_url, short_hash
from scxnn_node.model.manifest import (
    NOT_FOR_CLINICAL_USE,
    BundleError,
    tier_differences,
    verify_bundle,
)
from scxnn_node.model.options import BACKENDS, PRECISIONS
from scxnn_node.model.result import StudyResult
from scxnn_node.store.db import Database, SchemaMismatch

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
    infer.add_argument(
        "--backend", choices=BACKENDS, default=None, help="default: the config's (auto)"
    )
    infer.add_argument(
        "--body-part",
        action="append",
        dest="body_parts",
        metavar="PART",
        help="allowed Body Part Examined (repeatable; default CHEST and empty)",
    )

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, default=_default_config(), help="config.yaml")
        return p

    with_config(sub.add_parser("serve", help="run the node: SCP, scheduler, one worker per device"))
    worker = with_config(sub.add_parser("worker", help="run one inference worker alone"))
    worker.add_argument("--device", help="cpu or cuda:N (default: the config's first device)")
    status = with_config(sub.add_parser("status", help="queue counts, oldest study, errors"))
    status.add_argument("--json", action="store_true")
    jobs = sub.add_parser("jobs", help="list or retry jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    jlist = with_config(jsub.add_parser("list"))
    jlist.add_argument("--state", help="ready, claimed, done or failed")
    jlist.add_argument("--limit", type=int, default=50)
    jretry = with_config(jsub.add_parser("retry", help="failed job(s) back to ready"))
    jretry.add_argument("id", type=int, nargs="?")
    jretry.add_argument("--all-failed", action="store_true")
    deliveries = sub.add_parser("deliveries", help="list or retry deliveries")
    dsub = deliveries.add_subparsers(dest="deliveries_command", required=True)
    dlist = with_config(dsub.add_parser("list"))
    dlist.add_argument("--state", help="pending, sent or dead")
    dlist.add_argument("--limit", type=int, default=50)
    dretry = with_config(dsub.add_parser("retry", help="delivery (or all dead) back to pending"))
    dretry.add_argument("id", type=int, nargs="?")
    dretry.add_argument("--all-dead", action="store_true")
    echo = with_config(sub.add_parser("echo", help="C-ECHO a configured destination"))
    echo.add_argument("destination")
    send = with_config(sub.add_parser("send", help="C-STORE files (default: to this node)"))
    send.add_argument("files", nargs="+", type=Path)
    send.add_argument("--host", help="default: the node's host")
    send.add_argument("--port", type=int, help="default: the node's port")
    send.add_argument("--aec", help="called AE title (default: the node's)")
    send.add_argument("--aet", default="SCXNNSEND", help="calling AE title")
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", type=Path)
    with_config(sub.add_parser("demo", help="run the whole flow with a loopback PACS"))
    database = sub.add_parser("db", help="database schema")
    dbsub = database.add_subparsers(dest="db_command", required=True)
    with_config(dbsub.add_parser("upgrade", help="upgrade the schema in place (back up first)"))
    audit = sub.add_parser("audit", help="the audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    export = with_config(asub.add_parser("export", help="records as JSON lines, oldest first"))
    export.add_argument(
        "--since", required=True, type=_utc_datetime, help="ISO date or datetime (UTC default)"
    )
    export.add_argument("--until", type=_utc_datetime, help="exclusive (default: no end)")
    export.add_argument("--output", type=Path, help="file to write (default: stdout)")

    bundle = sub.add_parser("bundle", help="inspect model bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    verify = bsub.add_parser("verify", help="check a bundle's format and every hash")
    verify.add_argument("dir", type=Path)
    show = bsub.add_parser("show", help="print a bundle's manifest summary")
    show.add_argument("dir", type=Path)
    show.add_argument("--json", action="store_true")
    show.add_argument("--card", action="store_true", help="print the model card too")
    return parser


def _utc_datetime(text: str) -> datetime:
    """An ISO date or datetime as naive UTC, as the database stores times; one with a zone
    is converted."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or datetime: {text!r}") from None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _export_audit(db: Database, args: argparse.Namespace) -> int:
    from scxnn_node.store.audit import audit_records

    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        count = 0
        for record in audit_records(db, args.since, args.until):
            out.write(json.dumps(record) + "\n")
            count += 1
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"{count} audit record(s) written to {args.output}", file=sys.stderr)
    return 0


def _default_config() -> Path | None:
    path = Path("config.yaml")
    return path if path.is_file() else None


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
    from scxnn_node.imaging.decode import ImageRejected
    from scxnn_node.model.bundle import load_bundle
    from scxnn_node.model.engine import InferenceEngine
    from scxnn_node.triage import PreparedInstance, prepare_instance, triage_study

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
        options = config.engine_options(args.device or config.model.devices[0])
        engine = InferenceEngine(
            bundle,
            replace(
                options,
                batch_size=args.batch_size or options.batch_size,
                precision=args.precision or options.precision,
                backend=args.backend or options.backend,
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
    for warning in tier_differences(manifest):
        print(f"warning: {warning}", file=sys.stderr)
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
    print(f"precision:     {manifest.precision or 'not recorded'} (thresholds set at)")
    for line in _safety_net_lines(args.dir, manifest.files):
        print(line)
    if args.card:
        from scxnn_node.model.manifest import MODEL_CARD_FILE

        card = args.dir / MODEL_CARD_FILE
        print("\n" + (card.read_text() if MODEL_CARD_FILE in manifest.files else "no model card"))
    return 0


def _safety_net_lines(bundle_dir: Path, files: dict[str, str]) -> list[str]:
    """One line per critical finding: its threshold and guarantee, or what it lacks."""
    from scxnn_node.model.safety_net import SAFETY_NET_FILE, CriticalSafetyNet, CriticalThreshold

    if SAFETY_NET_FILE not in files:
        return ["safety net:    none (no critical-finding rule in this bundle)"]
    net = CriticalSafetyNet.from_dict(json.loads((bundle_dir / SAFETY_NET_FILE).read_text()))
    lines = [f"safety net:    {'guaranteed' if net.guarantee_met else 'GUARANTEE NOT MET'}"]
    for t in net.thresholds:
        bound = f"miss rate <= {t.miss_rate_upper_bound:.3f} at {t.confidence:.0%} confidence"
        if isinstance(t, CriticalThreshold):
            k = f"k={t.order_statistic_k} of {t.n_positive} positives"
            state = f"threshold {t.threshold:.4f}, {bound} ({k})"
        else:
            rule = "never fires" if t.threshold is None else f"threshold {t.threshold:.4f}"
            state = (
                f"NOT ENOUGH POSITIVES: {t.available} of {t.needed} needed; {rule}, {bound}"
            )
        lines.append(f"  {t.finding:<24} {state}")
    return lines


def _serve(config: NodeConfig) -> int:
    from scxnn_node.node import Node

    node = Node(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    stop.wait()
    log.info("stopping")
    node.stop()
    return 0


def _worker(config: NodeConfig, device: str | None) -> int:
    from scxnn_node.worker import TriageWorker

    worker = TriageWorker(config, device or config.model.devices[0])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.run(stop)
    return 0


def _rows(db: Database, model: type, state: str | None, limit: int) -> list:
    from sqlalchemy import select

    with db.session() as session:
        stmt = select(model).order_by(model.id.desc()).limit(limit)
        if state:
            stmt = stmt.where(model.state == state)
        return session.execute(stmt).scalars().all()


def _operate(args: argparse.Namespace, config: NodeConfig) -> int:
    from scxnn_node.store.models import Delivery, Job

    if args.command == "serve":
        return _serve(config)
    if args.command == "worker":
        return _worker(config, args.device)
    if args.command == "demo":
        from scxnn_node.demo import run_demo

        return run_demo(config)
    if args.command == "send":
        from scxnn_node.dicom.scu import Peer, is_success, send_files

        peer = Peer(
            args.aec or config.node.ae_title,
            args.host or config.node.host,
            args.port or config.node.port,
        )
        statuses = send_files(peer, args.aet, args.files)
        for path, status in zip(args.files, statuses, strict=True):
            text = "not sent" if status is None else f"0x{status:04X}"
            print(f"{path}: {text}")
        return 0 if all(is_success(s) for s in statuses) else 1
    if args.command == "echo":
        from scxnn_node.dicom.scu import Peer, echo

        try:
            destination = config.destination(args.destination)
        except KeyError as exc:
            print(f"scxnn-node: {exc.args[0]}", file=sys.stderr)
            return 2
        if destination.kind != "dicom":
            print(f"scxnn-node: {args.destination} is not a DICOM destination", file=sys.stderr)
            return 2
        ok, message = echo(Peer.of(destination), config.node.ae_title)
        print(
            f"C-ECHO {destination.name} ({destination.ae_title}@{destination.host}:"
            f"{destination.port}): {message}"
        )
        return 0 if ok else 1
    db = Database(config.database.url)
    if args.command == "db":
        before, after = db.upgrade_schema()
        done = "already at" if before == after else f"upgraded from {before or 'nothing'} to"
        print(f"database {db.shown_url}: schema {done} revision {after}")
        return 0
    db.create_schema()
    if args.command == "status":
        from scxnn_node.drift import node_drift_report
        from scxnn_node.status import format_status, node_status

        report = node_status(db, drift=node_drift_report(db, config))
        print(json.dumps(report, indent=2) if args.json else format_status(report))
        return 0
    if args.command == "audit":
        return _export_audit(db, args)
    if args.command == "jobs":
        if args.jobs_command == "list":
            for job in _rows(db, Job, args.state, args.limit):
                print(
                    f"{job.id:>6}  {job.state:<8} attempts {job.attempts}  "
                    f"study {short_hash(job.study_instance_uid)}  {job.last_error or ''}"
                )
            return 0
        if args.id is None and not args.all_failed:
            print("scxnn-node: jobs retry needs an ID or --all-failed", file=sys.stderr)
            return 2
        from scxnn_node.store.queue import JobQueue

        print(f"{JobQueue(db, 'cli').retry(args.id)} job(s) back to ready")
        return 0
    if args.command == "deliveries":
        if args.deliveries_command == "list":
            for d in _rows(db, Delivery, args.state, args.limit):
                print(
                    f"{d.id:>6}  {d.state:<8} {d.destination:<12} {d.kind:<8} "
                    f"attempts {d.attempts}  {d.last_error or ''}"
                )
            return 0
        if args.id is None and not args.all_dead:
            print("scxnn-node: deliveries retry needs an ID or --all-dead", file=sys.stderr)
            return 2
        from scxnn_node.store.results import retry_deliveries

        outcome = retry_deliveries(
            db, config.storage.spool_dir, args.id, all_dead=args.all_dead
        )
        print(f"{outcome.retried} delivery(ies) back to pending")
        for delivery_id, why in outcome.missing:
            print(f"delivery {delivery_id} not retried: {why}")
        return 1 if outcome.missing else 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "infer":
        logging.basicConfig(level=args.log_level.upper())
        return _infer(args)
    if args.command == "bundle":
        return _bundle(args)
    if args.command == "check-config":
        try:
            config = load_config(args.file)
        except ConfigError as exc:
            print(f"scxnn-node: {exc}", file=sys.stderr)
            return 1
        print(
            f"{args.file}: valid; {len(config.destinations)} destination(s), "
            f"bundle {config.model.bundle}, database {redact_url(config.database.url)}"
        )
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"scxnn-node: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, config.logging.json_format)
    try:
        return _operate(args, config)
    except SchemaMismatch as exc:  # an old schema: the message names `scxnn-node db upgrade`
        print(f"scxnn-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
