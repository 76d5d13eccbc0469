"""Inference speed of the real architecture: per member, per study, GFLOP/s, speed-up over naive.

    .venv/bin/python bench/inference.py                      # densenet121, 1024 px, cpu
    .venv/bin/python bench/inference.py --device cuda:0 --studies 32
    .venv/bin/python bench/inference.py --size 512 --studies 2  # quicker look

Members get random weights (speed does not depend on them). FLOPs are counted with
torch.utils.flop_counter on one member's inference pass. The naive baseline is measured in the
same run: decoder kept, NCHW, fp32, one image at a time, no fusion. The CPU peak defaults to the
cores torch uses x 2.45 GHz x 32 FP32 FLOP/cycle (AVX2, two FMA units); override --peak-gflops.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def seconds_per_call(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocators, oneDNN primitive cache, cuDNN autotune)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def member_flops(arch: str, size: int) -> int:
    member = MemberNet(arch, with_decoder=False).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        member(torch.rand(1, 1, size, size))
    return int(counter.get_total_flops())


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
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--backend", default="eager", choices=BACKENDS)
    parser.add_argument("--peak-gflops", type=float, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    threads = torch.get_num_threads()
    peak = args.peak_gflops or (threads * 2.45 * 32 if device.type == "cpu" else None)
    flops = member_flops(args.arch, args.size)
    print(
        f"device {device} ({threads} threads), {args.arch} at {args.size} px, "
        f"{flops / 1e9:.1f} GFLOP per member pass, {args.members} members"
    )

    torch.manual_seed(0)
    x_nchw = torch.rand(1, 1, args.size, args.size, device=device)
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    variants: dict[str, float] = {}
    naive = MemberNet(args.arch, with_decoder=True).eval().to(device)
    with torch.no_grad():
        variants["naive: decoder kept, NCHW, fp32"] = seconds_per_call(
            lambda: naive.forward_multitask(x_nchw), args.repeats, device
        )
    plain = MemberNet(args.arch, with_decoder=False).eval().to(device)
    with torch.inference_mode():
        variants["encoder+head, NCHW"] = seconds_per_call(
            lambda: plain(x_nchw), args.repeats, device
        )
        plain_cl = plain.to(memory_format=torch.channels_last)
        variants["encoder+head, channels_last"] = seconds_per_call(
            lambda: plain_cl(x_cl), args.repeats, device
        )
        fused = FusedMember(plain).to(device).to(memory_format=torch.channels_last)
        variants["fused, channels_last"] = seconds_per_call(
            lambda: fused(x_cl), args.repeats, device
        )
    for name, secs in variants.items():
        line = (
            f"  one member, one image, {name:<34} {secs:7.3f} s  {flops / secs / 1e9:7.1f} GFLOP/s"
        )
        if peak:
            line += f"  {100 * flops / secs / 1e9 / peak:5.1f}% of peak"
        print(line)

    bundle = untrained_bundle(args.arch, args.size, THESIS_CATALOGUE.names[: args.members])
    engine = InferenceEngine(
        bundle,
        EngineOptions(
            device=args.device,
            batch_size=args.batch_size,
            precision=args.precision,
            backend=args.backend,
        ),
    )
    images = np.random.default_rng(1).integers(
        0, 256, (args.studies, args.size, args.size), dtype=np.uint8
    )
    engine.member_logits(images[:1])  # warm-up every member
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    engine.member_logits(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    per_study = elapsed / args.studies
    achieved = flops * args.members * args.studies / elapsed / 1e9
    naive_study = variants["naive: decoder kept, NCHW, fp32"] * args.members
    figures = {
        "device": str(device),
        "arch": args.arch,
        "size": args.size,
        "members": args.members,
        "batch_size": engine.batch_size,
        "precision": str(engine.autocast_dtype or "fp32"),
        "gflop_per_member_pass": flops / 1e9,
        "images_per_s_per_member": args.studies * args.members / elapsed,
        "studies_per_s": 1 / per_study,
        "seconds_per_study": per_study,
        "achieved_gflops": achieved,
        "peak_gflops": peak,
        "percent_of_peak": 100 * achieved / peak if peak else None,
        "naive_seconds_per_study": naive_study,
        "speedup_over_naive": naive_study / per_study,
        "single_member_seconds": variants,
    }
    print(
        f"ensemble through the engine (batch {engine.batch_size}, {figures['precision']}): "
        f"{per_study:.2f} s per study, {figures['studies_per_s']:.3f} studies/s, "
        f"{figures['images_per_s_per_member']:.2f} images/s per member"
    )
    print(
        f"achieved {achieved:.1f} GFLOP/s"
        + (f" = {figures['percent_of_peak']:.1f}% of the {peak:.0f} GFLOP/s peak" if peak else "")
    )
    speedup = figures["speedup_over_naive"]
    print(f"naive baseline {naive_study:.2f} s per study -> speed-up {speedup:.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
