"""Inference speed of the real architecture: per member, per study, GFLOP/s, speed-up over naive.

    .venv/bin/python bench/inference.py                      # densenet121, 1024 px, cpu
    .venv/bin/python bench/inference.py --device cuda:0 --studies 32
    .venv/bin/python bench/inference.py --size 512 --studies 2  # quicker look
    .venv/bin/python bench/inference.py --quick --members 1 --studies 1 \
        --engine-repeats 3 --repeats 5      # fused eager vs ONNX Runtime only, one member
    python3 bench/inference.py --device cuda:0 --quick --studies 64 \
        --sweep eager:16,eager:32,cuda_graph:32,cuda_graph:32:4   # GPU: backend:batch[:streams]

Members get random weights (speed does not depend on them). FLOPs are counted with
torch.utils.flop_counter on one member's inference pass. The naive baseline is measured in the
same run: decoder kept, NCHW, fp32, one image at a time, no fusion. Every form is timed pass by
pass in turns (form A, form B, ..., then again), so a load that comes and goes on a shared
machine falls on all of them alike; min and median are printed. On the CPU the onnx backend
(ONNX Runtime) runs beside eager in the same process. On a GPU the single-member forms are the
fused member at --member-batch images, bf16 by autocast (the engine before 2026-11-27) and with
its weights cast to bf16 (the engine now); --sweep then times whole-ensemble engines one after
another (backend, batch, CUDA streams), each on the same images, and keeps the fastest. The
CPU peak defaults to the cores torch uses x 2.45 GHz x 32 FP32 FLOP/cycle (AVX2, two FMA
units); override --peak-gflops.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

# `python bench/X.py` puts bench/ first on sys.path, where bench/training.py would shadow the
# training package; the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.fused import FusedMember
from scxnn_node.model.member import MemberNet
from scxnn_node.model.options import BACKENDS, EngineOptions
from training.untrained import untrained_bundle


def interleaved_timings(
    forms: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each call of each form, the forms taking turns pass by pass."""

    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for fn in forms.values():
        fn()  # warm-up (allocators, oneDNN primitive cache, cuDNN autotune, ORT arenas)
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, fn in forms.items():
            times[name].append(timed(fn))
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"min": min(times), "median": statistics.median(times)}


def member_flops(arch: str, size: int) -> int:
    member = MemberNet(arch, with_decoder=False).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        member(torch.rand(1, 1, size, size))
    return int(counter.get_total_flops())


def gpu_member_forms(
    args: argparse.Namespace, device: torch.device, rate: Callable[[float], str]
) -> dict[str, dict[str, float]]:
    """One member at --member-batch images: bf16 by autocast (before) vs weights cast (now)."""
    plain = MemberNet(args.arch, with_decoder=False).eval()
    fused32 = FusedMember(plain).to(device).to(memory_format=torch.channels_last)
    fused16 = copy.deepcopy(fused32).to(torch.bfloat16)
    x32 = torch.rand(args.member_batch, 1, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    x16 = x32.to(torch.bfloat16)

    def autocast_pass() -> object:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fused32(x32)

    forms: dict[str, Callable[[], object]] = {
        "fused, bf16 autocast (before)": autocast_pass,
        "fused, bf16 weights (now)": lambda: fused16(x16),
    }
    with torch.inference_mode():
        times = interleaved_timings(forms, args.repeats, device)
    variants = {}
    print(f"one member, {args.member_batch} images a pass, {args.repeats} passes: per image")
    for name, t in times.items():
        v = {key: value / args.member_batch for key, value in summary(t).items()}
        variants[name] = v
        print(f"  {name:<34} {v['min'] * 1e3:7.2f} / {v['median'] * 1e3:7.2f} ms  {rate(v['min'])}")
    return variants


def _op_category(name: str, shapes: list) -> str:
    """A profiled op's row: convolutions by kernel size (weight shape is the second input)."""
    if "conv" in name and len(shapes) > 1 and len(shapes[1]) == 4:
        out_channels, _, kh, kw = shapes[1]
        return f"conv {kh}x{kw}" + (
            " (1x1 in dense layers)" if kh == 1 and out_channels == 128 else ""
        )
    return name


def _kernel_category(name: str) -> str:
    """A compiled pass's kernel: Inductor's fused kernels by what they fuse (their index
    dropped), library kernels (convolutions) by name."""
    if name.startswith(("triton_", "cpp_fused")):
        return name.rstrip("0123456789").rstrip("_")
    return name


def profile_member(
    args: argparse.Namespace, device: torch.device, compiled: bool = False
) -> dict[str, dict[str, float]]:
    """Where one member pass spends its time: self time of each op (device time on a GPU), one
    fused member at the engine's dtype, --member-batch images (1 on a CPU), 3 profiled passes.
    `compiled`: the member through torch.compile (mode --compile-mode), timed by kernel, since
    Inductor launches its fused kernels without an op around them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.member_batch if device.type == "cuda" else 1
    member = FusedMember(MemberNet(args.arch, with_decoder=False).eval()).to(device, dtype)
    member = member.to(memory_format=torch.channels_last)
    if compiled:
        member = torch.compile(member, mode=args.compile_mode)
    x = torch.rand(batch, 1, args.size, args.size, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    passes = 3
    with torch.inference_mode():
        member(x)  # warm-up: cuDNN picks its algorithms (Inductor compiles) outside the profile
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(passes):
                member(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    rows: dict[str, dict[str, float]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if device.type == "cuda":
            us = getattr(event, "self_device_time_total", None)
            if us is None:
                us = event.self_cuda_time_total
        else:
            us = event.self_cpu_time_total
        if compiled and device.type == "cuda":
            # Kernels: Inductor's own are launched without an op around them.
            if us <= 0 or event.device_type != DeviceType.CUDA:
                continue
            category = _kernel_category(event.key)
        else:
            # Ops only: a kernel's time is already the self device time of the op launching it.
            if us <= 0 or event.device_type != DeviceType.CPU or event.key.startswith("cuda"):
                continue
            category = _op_category(event.key, event.input_shapes or [])
        row = rows.setdefault(category, {"ms": 0.0})
        row["ms"] += us / 1e3 / passes / batch  # per image
        row["calls"] = row.get("calls", 0) + event.count / passes
    total = sum(r["ms"] for r in rows.values())
    for row in rows.values():
        row["percent"] = 100 * row["ms"] / total
    ranked = dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms"])[:16])
    clock = "device" if device.type == "cuda" else "CPU"
    form = f"compiled ({args.compile_mode})" if compiled else "eager"
    print(
        f"profile, {form}: one member, {batch} images a pass, {clock} ms per image, "
        f"{total:.3f} in all"
    )
    for name, row in ranked.items():
        share = f"{row['ms']:8.3f} ms {row['percent']:5.1f}%"
        print(f"  {name[:48]:<48} {share}  {row['calls']:.0f} calls")
    return ranked


def sweep_engines(
    args: argparse.Namespace, device: torch.device, flops: int, peak: float | None
) -> dict[str, dict[str, object]]:
    """Whole-ensemble engines, one after another, on the same images: studies/s of each."""
    bundle = untrained_bundle(args.arch, args.size, THESIS_CATALOGUE.names[: args.members])
    images = np.random.default_rng(1).integers(
        0, 256, (args.studies, args.size, args.size), dtype=np.uint8
    )
    results: dict[str, dict[str, object]] = {}
    reference: np.ndarray | None = None
    for spec in args.sweep.split(","):
        backend, batch, *rest = spec.split(":")
        streams = int(rest[0]) if rest else 1
        mode = rest[1] if len(rest) > 1 else args.compile_mode
        start = time.perf_counter()
        try:
            engine = InferenceEngine(
                bundle,
                EngineOptions(
                    device=str(device),
                    batch_size=int(batch),
                    precision=args.precision,
                    backend=backend,
                    member_streams=streams,
                    compile_mode=mode,
                ),
            )
            with torch.inference_mode():
                logits = engine.member_logits(images[: int(batch)])  # warm-up: capture, tune
            ready = time.perf_counter() - start
            times = [
                t / args.studies
                for t in interleaved_timings(
                    {spec: functools.partial(engine.member_logits, images)},
                    args.engine_repeats,
                    device,
                )[spec]
            ]
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as exc:
            print(f"engine {spec}: failed: {str(exc).splitlines()[0][:200]}")
            results[spec] = {"error": str(exc).splitlines()[0][:500]}
            torch.cuda.empty_cache()
            continue
        if reference is None:
            reference = logits
        per_study = min(times)
        achieved = flops * args.members / per_study / 1e9
        results[spec] = {
            "backend": backend,
            "batch": int(batch),
            "member_streams": streams,
            "compile_mode": mode if backend == "compile" else None,
            "precision": engine.precision,
            "ready_seconds": ready,
            "seconds_per_study": summary(times),
            "studies_per_s": 1 / per_study,
            "achieved_gflops": achieved,
            "percent_of_peak": 100 * achieved / peak if peak else None,
            "max_logit_difference_to_first": float(
                np.abs(logits[: len(reference)] - reference[: len(logits)]).max()
            ),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        }
        print(
            f"engine {spec:<20} ({engine.precision}): {1 / per_study:7.1f} studies/s "
            f"(min of {args.engine_repeats} x {args.studies}), {achieved / 1e3:6.1f} TFLOP/s"
            + (f" {100 * achieved / peak:4.1f}% of peak" if peak else "")
            + f", ready in {ready:.1f} s, "
            f"peak memory {results[spec]['peak_memory_gib']:.1f} GiB"
        )
        del engine
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timed = {k: v for k, v in results.items() if "studies_per_s" in v}
    if timed:
        best = max(timed, key=lambda k: timed[k]["studies_per_s"])  # type: ignore[arg-type,return-value]
        print(f"fastest: {best} at {timed[best]['studies_per_s']:.1f} studies/s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--members", type=int, default=13)
    parser.add_argument(
        "--studies", type=int, default=2, help="one image each, timed through the engine"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed repeats of single-member passes"
    )
    parser.add_argument(
        "--engine-repeats", type=int, default=1, help="timed runs of all studies per backend"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated, of {','.join(BACKENDS)} (default: eager,onnx on cpu; eager)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="single-member forms: fused eager and onnx only"
    )
    parser.add_argument("--peak-gflops", type=float, default=None)
    parser.add_argument(
        "--member-batch", type=int, default=16, help="GPU: images per single-member pass"
    )
    parser.add_argument(
        "--sweep",
        default=None,
        help="GPU: engines to time one after another, as backend:batch[:streams[:compile_mode]],..",
    )
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument(
        "--profile", action="store_true", help="print where one member pass spends its time"
    )
    parser.add_argument(
        "--profile-compiled",
        action="store_true",
        help="the same for the member compiled with --compile-mode, kernel by kernel",
    )
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    backends = (args.backends or ("eager,onnx" if device.type == "cpu" else "eager")).split(",")
    for backend in backends:
        if backend not in BACKENDS:
            parser.error(f"--backends: {backend!r} is not one of {list(BACKENDS)}")
    threads = torch.get_num_threads()
    peak = args.peak_gflops or (threads * 2.45 * 32 if device.type == "cpu" else None)
    flops = member_flops(args.arch, args.size)
    print(
        f"device {device} ({threads} threads), {args.arch} at {args.size} px, "
        f"{flops / 1e9:.1f} GFLOP per member pass, {args.members} members"
    )

    def rate(secs: float) -> str:
        line = f"{flops / secs / 1e9:6.1f} GFLOP/s"
        return line + (f" {100 * flops / secs / 1e9 / peak:5.1f}% of peak" if peak else "")

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine sets it
    profiled = profile_member(args, device) if args.profile else None
    profiled_compiled = (
        profile_member(args, device, compiled=True) if args.profile_compiled else None
    )
    if device.type == "cuda":
        variants = gpu_member_forms(args, device, rate)
        per_backend = sweep_engines(args, device, flops, peak) if args.sweep else {}
        figures = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "arch": args.arch,
            "size": args.size,
            "members": args.members,
            "gflop_per_member_pass": flops / 1e9,
            "peak_gflops": peak,
            "member_batch": args.member_batch,
            "single_member_seconds_per_image": variants,
            "profile_ms_per_image": profiled,
            "compiled_profile_ms_per_image": profiled_compiled,
            "sweep": per_backend,
        }
        if args.json_out:
            args.json_out.write_text(json.dumps(figures, indent=2))
        if args.sweep:
            return
    x_nchw = torch.rand(1, 1, args.size, args.size, device=device)
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    forms: dict[str, Callable[[], object]] = {}
    naive = MemberNet(args.arch, with_decoder=True).eval().to(device)
    plain = MemberNet(args.arch, with_decoder=False).eval().to(device)
    plain.load_state_dict(naive.state_dict(), strict=False)
    fused = FusedMember(plain).to(device).to(memory_format=torch.channels_last)
    if not args.quick:

        def run_naive() -> object:
            with torch.no_grad():
                return naive.forward_multitask(x_nchw)

        forms["naive: decoder kept, NCHW, fp32"] = run_naive
        forms["encoder+head, NCHW"] = lambda: plain(x_nchw)
        plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        forms["encoder+head, channels_last"] = lambda: plain_cl(x_cl)
    forms["fused, channels_last (eager)"] = lambda: fused(x_cl)
    if device.type == "cpu" and "onnx" in backends:
        from scxnn_node.model.onnx_backend import OnnxMember, export_member

        start = time.perf_counter()
        session = OnnxMember(export_member(plain, args.size), threads)
        print(f"  onnx export + session: {time.perf_counter() - start:.1f} s per member")
        x_numpy = x_nchw.cpu().numpy()
        with torch.inference_mode():
            difference = np.abs(session(x_numpy) - plain(x_nchw).numpy()).max()
        print(f"  onnx logits differ from the plain member's by at most {difference:.1e}")
        forms["onnx runtime, encoder+head"] = lambda: session(x_numpy)
    with torch.inference_mode():
        times = interleaved_timings(forms, args.repeats, device)
    variants = {name: summary(t) for name, t in times.items()}
    print(f"one member, one image, {args.repeats} passes each, in turns: min / median")
    for name, v in variants.items():
        print(f"  {name:<34} {v['min']:6.3f} / {v['median']:6.3f} s  min {rate(v['min'])}")

    bundle = untrained_bundle(args.arch, args.size, THESIS_CATALOGUE.names[: args.members])
    cache_dir = Path(tempfile.mkdtemp(prefix="scxnn-bench-onnx-"))
    engines: dict[str, InferenceEngine] = {}
    for backend in backends:
        start = time.perf_counter()
        engines[backend] = InferenceEngine(
            bundle,
            EngineOptions(
                device=args.device,
                batch_size=args.batch_size,
                precision=args.precision,
                backend=backend,
                onnx_cache_dir=cache_dir,
            ),
        )
        print(f"engine {backend}: ready in {time.perf_counter() - start:.1f} s")
    images = np.random.default_rng(1).integers(
        0, 256, (args.studies, args.size, args.size), dtype=np.uint8
    )
    # Each timed call runs all studies (in the engine's batches), backends in turns.
    study_calls: dict[str, Callable[[], object]] = {}
    for backend, engine in engines.items():
        study_calls[backend] = (lambda e: lambda: e.member_logits(images))(engine)
    study_times = {
        backend: [t / args.studies for t in times]
        for backend, times in interleaved_timings(study_calls, args.engine_repeats, device).items()
    }
    engine = engines[backends[0]]
    naive_key = "naive: decoder kept, NCHW, fp32"
    naive_study = variants[naive_key]["min"] * args.members if naive_key in variants else None
    per_backend = {}
    for backend, t in study_times.items():
        per_study = min(t)
        achieved = flops * args.members / per_study / 1e9
        per_backend[backend] = {
            "seconds_per_study": summary(t),
            "studies_per_s": 1 / per_study,
            "achieved_gflops": achieved,
            "percent_of_peak": 100 * achieved / peak if peak else None,
            "speedup_over_naive": naive_study / per_study if naive_study else None,
        }
        print(
            f"ensemble through the engine, backend {backend} (batch {engines[backend].batch_size},"
            f" {engines[backend].precision}), {args.engine_repeats} x {args.studies} studies: "
            f"{per_study:.2f} / {statistics.median(t):.2f} s per study (min / median); "
            f"min {rate(per_study / args.members)}"
            + (f"; {naive_study / per_study:.2f}x the naive baseline" if naive_study else "")
        )
    figures = {
        "device": str(device),
        "arch": args.arch,
        "size": args.size,
        "members": args.members,
        "threads": threads,
        "batch_size": engine.batch_size,
        "precision": engine.precision,
        "gflop_per_member_pass": flops / 1e9,
        "peak_gflops": peak,
        "naive_seconds_per_study": naive_study,
        "single_member_seconds": variants,
        "profile_ms_per_image": profiled,
        "compiled_profile_ms_per_image": profiled_compiled,
        "engine": per_backend,
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
