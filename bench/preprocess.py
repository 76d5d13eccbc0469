"""CPU cost of getting one instance ready for the engine: decode, window, preprocess.

    .venv/bin/python bench/preprocess.py                 # 2500 px 12-bit, raw and JPEG 2000
    .venv/bin/python bench/preprocess.py --source-px 3000 --repeats 8
    python3 bench/preprocess.py --device cuda:0      # and the preprocessing on a GPU

The instances are bench/e2e.py's: the shipped chest DX resized to --source-px, 12-bit, as a
CR/DX detector gives, uncompressed and JPEG 2000 lossless. Prints CPU seconds per instance
(process time, min over --repeats) of `load_image` (read + decode), `window_to_uint8` and
`preprocess_image` on the decoded pixels, and `prepare_instance` (all of it, as a decode
process runs it), and the same windowing done the float64 way (the definition) for comparison.
With --device, also `preprocess_on_device` and `prepare_instance` preprocessing there (what a
GPU worker's decode process runs; its CPU seconds include waiting for the device, which CUDA
spends spinning), and their wall seconds.
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


def cpu_seconds(
    fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.process_time
) -> float:
    """The least `clock` seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def report(what: str, repeats: int, figures: dict[str, float]) -> None:
    print(
        f"{what}, CPU s per instance (min of {repeats}): "
        + ", ".join(f"{step} {seconds:.3f}" for step, seconds in figures.items())
    )


def device_figures(
    device: str,
    spec: PreprocessSpec,
    instances: dict[str, Path],
    repeats: int,
    figures: dict[str, dict[str, float]],
) -> None:
    """Preprocessing on `device`, and the whole of a decode process's work on a CUDA device
    (nvImageCodec decoding where installed): CPU and wall seconds."""
    from scxnn_node.imaging.device_preprocess import preprocess_on_device
    from scxnn_node.imaging.gpu_decode import enable_gpu_decoding

    if device.startswith("cuda"):
        enable_gpu_decoding(int(device.partition(":")[2] or 0))
    for name, path in instances.items():
        pixels = load_image(path).pixels
        steps: dict[str, Callable[[], object]] = {
            "preprocess_on_device": lambda x=pixels: preprocess_on_device(x, spec, device),
            "prepare_instance_on_device": lambda p=path: prepare_instance(
                p, spec, preprocess_device=device
            ),
        }
        measured = {}
        for step, fn in steps.items():
            measured[step] = cpu_seconds(fn, repeats)
            measured[f"{step}_wall"] = cpu_seconds(fn, repeats, time.perf_counter)
        if device.startswith("cuda"):
            import torch

            peak = torch.cuda.max_memory_allocated(device)
            measured["peak_device_memory_mib"] = peak / (1 << 20)
        figures[name].update(measured)
        report(f"on {device}, {name}", repeats, measured)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--source-px", type=int, default=2500)
    parser.add_argument("--size", type=int, default=1024, help="the bundle's input size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", help="a torch device to preprocess on as well (cuda:0)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    spec = PreprocessSpec(size=args.size)
    instances = {
        name: study_files(source_template(args.source_px, j2k), Path(tempfile.mkdtemp()), 1)[0]
        for name, j2k in (("uncompressed", False), ("jpeg2000", True))
    }
    figures: dict[str, dict[str, float]] = {}
    for name, path in instances.items():
        pixels = load_image(path).pixels
        steps: dict[str, Callable[[], object]] = {
            "load_image": lambda p=path: load_image(p),
            "window_to_uint8": lambda x=pixels: window_to_uint8(x, spec),
            "window_float64": lambda x=pixels: window_in_float64(x, spec),
            "preprocess_image": lambda x=pixels: preprocess_image(x, spec),
            "prepare_instance": lambda p=path: prepare_instance(p, spec),
        }
        figures[name] = {step: cpu_seconds(fn, args.repeats) for step, fn in steps.items()}
        report(f"{args.source_px} px 12-bit, {name}", args.repeats, figures[name])
    if args.device:
        device_figures(args.device, spec, instances, args.repeats, figures)
    if args.json_out:
        args.json_out.write_text(json.dumps({"source_px": args.source_px, **figures}, indent=2))


if __name__ == "__main__":
    main()
