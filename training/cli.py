"""scxnn-train: from labelled chest X-rays to a verified bundle the node loads.

synth        synthetic images with lesion masks and a manifest (for trying the pipeline)
import-*     public dataset layouts -> manifest
fit          train the members and the second stage of a run (--member NAME for one)
export       a finished run -> versioned bundle
evaluate     a bundle on a labelled manifest -> metrics.json, report.md, figures
demo-bundle  the small demo bundle through the same pipeline
"""

from __future__ import annotations

import argparse
import logging
import sys

from scxnn_node.config import ConfigError
from scxnn_node.model.manifest import BundleError
from scxnn_node.model.options import PRECISIONS
from training.cache import CacheError
from training.class_mapping import DatasetImportError
from training.dataset import ManifestError
from training.distributed import process_group
from training.member_training import TrainingInterrupted
from training.run_layout import RunError

USER_ERRORS = (
    BundleError,
    CacheError,
    ConfigError,
    DatasetImportError,
    ManifestError,
    RunError,
    TrainingInterrupted,
    FileNotFoundError,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scxnn-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic images, masks and DIR/manifest.csv")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, required=True, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weak-fraction", type=float, default=0.25)
    p.add_argument("--findings", nargs="+", help="default: all 13")

    p = sub.add_parser("fit", help="train a run: all members and the second stage")
    p.add_argument("--config", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--member", help="train only this finding's member")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--stop-after-epochs",
        type=int,
        help="stop (resumably) after this many epochs in this invocation, e.g. on a time-limited "
        "queue",
    )
    p.add_argument(
        "--allow-random-init",
        action="store_true",
        help="train a non-demo config without pretrained (ImageNet) encoder weights",
    )

    p = sub.add_parser("export", help="write a finished run as a versioned bundle")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, help="new bundle directory")
    p.add_argument("--version", required=True, help="semantic version X.Y.Z")
    p.add_argument("--changelog", help="changelog line (default: describes the run)")
    p.add_argument("--previous", help="previous bundle whose changelog lines to carry on")
    p.add_argument(
        "--not-for-clinical-use",
        action="store_true",
        help="export a run whose guarantee is not met, marked NOT FOR CLINICAL USE",
    )

    p = sub.add_parser("evaluate", help="evaluate a bundle on a labelled manifest")
    p.add_argument("--bundle", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--split", default="auto", help="auto (test rows if any, else all), all, train, val or test"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda:N, as the node runs")
    p.add_argument(
        "--precision", default="auto", choices=PRECISIONS, help="as the node's model.precision"
    )
    p.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    p.add_argument("--cache-dir", help="preprocessed-image cache (default OUT/cache)")

    p = sub.add_parser("import-folders", help="class folders or a labels CSV -> manifest")
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--mapping", required=True, help="YAML: classes: {class: finding|normal}")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--labels", help="CSV with image,label columns instead of class folders")
    p.add_argument("--patient-regex", help="patient id pattern on the file name")
    p.add_argument("--patient-column", help="labels CSV column the pattern applies to")

    p = sub.add_parser("import-csv", help="another dataset's labels CSV -> manifest")
    p.add_argument("--source", required=True)
    p.add_argument("--mapping", required=True, help="YAML describing the columns")
    p.add_argument("--out", required=True)

    p = sub.add_parser("import-chestx-det", help="ChestX-Det polygon JSON -> manifest")
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--mapping", required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("import-siim", help="SIIM-ACR RLE CSV + DICOM folder -> manifest")
    p.add_argument("--rle", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("demo-bundle", help="train the small demo bundle on synthetic images")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--count", type=int, default=380, help="synthetic images")
    p.add_argument("--size", type=int, default=128, help="synthetic image side")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command == "synth":
        from training.synthetic import write_synthetic_dataset

        kwargs = {"findings": args.findings} if args.findings else {}
        path = write_synthetic_dataset(
            args.out, args.count, args.size, args.seed, weak_fraction=args.weak_fraction, **kwargs
        )
        print(f"wrote {args.count} synthetic images and {path}")
    elif args.command == "fit":
        from training.config import load_training_config
        from training.fit import fit_run

        config = load_training_config(args.config)
        with process_group(config.training.device) as dist_info:
            metrics = fit_run(
                config,
                args.manifest,
                args.out,
                member=args.member,
                resume=args.resume,
                stop_after_epochs=args.stop_after_epochs,
                dist_info=dist_info,
                progress=progress,
                allow_random_init=args.allow_random_init,
            )
        if metrics is not None:
            auc = metrics["auc"] if metrics["auc"] is not None else float("nan")
            print(
                f"run {args.out}: validation sensitivity {metrics['sensitivity']:.3f}, "
                f"specificity {metrics['specificity']:.3f}, AUC {auc:.3f}"
            )
        elif dist_info.is_main:
            print(f"member {args.member} trained in {args.out}")
    elif args.command == "export":
        from training.export import export_bundle

        manifest = export_bundle(
            args.run,
            args.out,
            args.version,
            args.changelog,
            args.previous,
            not_for_clinical_use=args.not_for_clinical_use,
        )
        print(f"bundle {manifest.name} {manifest.version} written to {args.out}")
    elif args.command == "evaluate":
        from training.evaluate import evaluate_bundle

        m = evaluate_bundle(
            args.bundle,
            args.manifest,
            args.out,
            split=args.split,
            device=args.device,
            precision=args.precision,
            cache_dir=args.cache_dir,
            workers=args.workers,
            progress=progress,
        )
        st = m["study"]
        print(
            f"{m['n_images']} images ({m['split']}): sensitivity {m['sensitivity']} "
            f"{m['sensitivity_ci']}, specificity {m['specificity']} {m['specificity_ci']}; "
            f"{st['n_studies']} studies: sensitivity {st['sensitivity']} {st['sensitivity_ci']}, "
            f"specificity {st['specificity']} {st['specificity_ci']}; "
            f"report in {args.out}/report.md"
        )
    elif args.command.startswith("import-"):
        from training import importers

        if args.command == "import-folders":
            path = importers.import_class_folders(
                args.root,
                args.mapping,
                args.out,
                labels_csv=args.labels,
                patient_regex=args.patient_regex,
                patient_column=args.patient_column,
            )
        elif args.command == "import-csv":
            path = importers.import_generic_csv(args.source, args.mapping, args.out)
        elif args.command == "import-chestx-det":
            path = importers.import_chestx_det(
                args.annotations, args.images, args.mapping, args.out
            )
        else:
            path = importers.import_siim(args.rle, args.images, args.out)
        from training.dataset import load_manifest

        manifest = load_manifest(path)  # validate what was written
        print(f"wrote {path}: {len(manifest.entries)} images, findings {list(manifest.findings)}")
    elif args.command == "demo-bundle":
        from training.demo import build_demo_bundle

        manifest = build_demo_bundle(
            args.out, args.count, args.size, args.epochs, args.seed, progress=progress
        )
        vp = manifest.operating_point.validation
        print(
            f"demo bundle {manifest.name} {manifest.version} written to {args.out}: "
            f"validation sensitivity {vp['sensitivity']:.3f}, specificity {vp['specificity']:.3f}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _run(args)
    except USER_ERRORS as exc:
        print(f"scxnn-train {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, TrainingInterrupted) else 1


if __name__ == "__main__":
    sys.exit(main())
