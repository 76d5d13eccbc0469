"""CPU cost of getting one instance ready for the engine: decode, window, preprocess.

    .venv/bin/python bench/preprocess.py                 # 2500 px 12-bit, raw and JPEG 2000
    .venv/bin/python bench/preprocess.py --source-px 3000 --repeats 8

The instances are bench/e2e.py's: the shipped chest DX resized to --source-px, 12-bit, as a
CR/DX detector gives, uncompressed and JPEG 2000 lossless. Prints CPU seconds per instance
(process time, min over --repeats) of `load_image` (read + decode), `window_to_uint8` and
`preprocess_image` on the decoded pixels, and `prepare_instance` (all of it, as a decode
process runs it), and the same windowing done the float64 way (the definition) for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import source_template, study_files  # bench/e2e.py: the same generated instances

from scxnn_node.imaging.decode import load_image
from scxnn_node.imaging.preprocess import (
    PreprocessSpec,
    preprocess_image,
    window_in_float64,
    window_to_uint8,
)
from scxnn_node.triage import prepare_instance


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--source-px", type=int, default=2500)
    parser.add_argument("--size", type=int, default=1024, help="the bundle's input size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    spec = PreprocessSpec(size=args.size)
    figures: dict[str, dict[str, float]] = {}
    for name, j2k in (("uncompressed", False), ("jpeg2000", True)):
        (path,) = study_files(source_template(args.source_px, j2k), Path(tempfile.mkdtemp()), 1)
        pixels = load_image(path).pixels
        steps: dict[str, Callable[[], object]] = {
            "load_image": lambda p=path: load_image(p),
            "window_to_uint8": lambda x=pixels: window_to_uint8(x, spec),
            "window_float64": lambda x=pixels: window_in_float64(x, spec),
            "preprocess_image": lambda x=pixels: preprocess_image(x, spec),
            "prepare_instance": lambda p=path: prepare_instance(p, spec),
        }
        figures[name] = {step: cpu_seconds(fn, args.repeats) for step, fn in steps.items()}
        print(
            f"{args.source_px} px 12-bit, {name}, CPU s per instance (min of {args.repeats}): "
            + ", ".join(f"{step} {seconds:.3f}" for step, seconds in figures[name].items())
        )
    if args.json_out:
        args.json_out.write_text(json.dumps({"source_px": args.source_px, **figures}, indent=2))


if __name__ == "__main__":
    main()
