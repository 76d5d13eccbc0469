"""Synthetic chest-like radiographs with lesion masks, for tests and the demo bundle.

Each image has a torso, two lungs with rib shadows, a heart and a spine; each of the thesis's
findings has its own drawn pattern at a plausible place, and its mask marks where it is. Images
come out as 12-bit values with random exposure so that preprocessing has real work to do. They
look like nothing clinical and no claim rests on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from scxnn_node.findings import THESIS_CATALOGUE


@dataclass(frozen=True)
class SyntheticCase:
    pixels: np.ndarray  # uint16 (height, width), bone bright
    labels: dict[str, int]  # finding -> 0/1
    masks: dict[str, np.ndarray]  # finding -> uint8 mask (height, width), present findings only


@dataclass(frozen=True)
class _Anatomy:
    size: int
    left_lung: tuple[int, int, int, int]  # centre x, centre y, half-width, half-height
    right_lung: tuple[int, int, int, int]
    heart: tuple[int, int, int, int]


def _ellipse(
    canvas: np.ndarray, box: tuple[int, int, int, int], value: float, angle: float = 0
) -> None:
    cx, cy, ax, ay = box
    cv2.ellipse(canvas, (cx, cy), (max(ax, 1), max(ay, 1)), angle, 0, 360, value, -1)


def _anatomy(rng: np.random.Generator, s: int) -> _Anatomy:
    j = lambda f: round(s * (f + rng.uniform(-0.015, 0.015)))  # noqa: E731
    return _Anatomy(
        size=s,
        right_lung=(j(0.32), j(0.45), j(0.14), j(0.27)),  # image left = patient right
        left_lung=(j(0.68), j(0.45), j(0.14), j(0.27)),
        heart=(j(0.56), j(0.62), j(0.11), j(0.09)),
    )


def _base_image(rng: np.random.Generator, a: _Anatomy) -> np.ndarray:
    s = a.size
    img = np.full((s, s), 0.05, np.float32)
    _ellipse(img, (s // 2, int(s * 0.55), int(s * 0.42), int(s * 0.5)), 0.55)  # torso
    for lung in (a.left_lung, a.right_lung):
        _ellipse(img, lung, 0.18)
    # Ribs: bright arcs across both lungs.
    ribs = np.zeros_like(img)
    for k in range(7):
        y = int(s * (0.22 + 0.075 * k))
        cv2.ellipse(
            ribs, (s // 2, y), (int(s * 0.33), int(s * 0.05)), 0, 200, 340, 0.12, max(1, s // 90)
        )
    lungs_mask = np.zeros_like(img)
    for lung in (a.left_lung, a.right_lung):
        _ellipse(lungs_mask, lung, 1.0)
    img += ribs * lungs_mask
    _ellipse(img, a.heart, 0.62)
    cv2.rectangle(img, (int(s * 0.48), int(s * 0.08)), (int(s * 0.52), int(s * 0.95)), 0.7, -1)
    # Fine lung texture.
    texture = cv2.GaussianBlur(rng.normal(0, 0.04, (s, s)).astype(np.float32), (0, 0), s / 150)
    img += texture * lungs_mask
    return img


# Each pattern draws its finding into `img` and returns the finding's mask.
Pattern = Callable[[np.random.Generator, np.ndarray, _Anatomy], np.ndarray]


def _lung(rng: np.random.Generator, a: _Anatomy) -> tuple[int, int, int, int]:
    return a.left_lung if rng.random() < 0.5 else a.right_lung


def _blob(img: np.ndarray, box: tuple[int, int, int, int], value: float, blur: float) -> np.ndarray:
    mask = np.zeros(img.shape, np.float32)
    _ellipse(mask, box, 1.0)
    soft = cv2.GaussianBlur(mask, (0, 0), max(blur, 0.5)) if blur > 0 else mask
    img += value * soft
    return (mask > 0).astype(np.uint8)


def _pneumothorax(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = _lung(rng, a)
    mask = np.zeros(img.shape, np.float32)
    cv2.ellipse(mask, (cx, cy - ay // 2), (ax, ay // 2), 0, 180, 360, 1.0, -1)
    img[mask > 0] = 0.04  # no lung markings, very dark
    return (mask > 0).astype(np.uint8)


def _pneumoperitoneum(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = a.right_lung
    box = (cx, cy + ay + max(2, a.size // 40), ax, max(2, a.size // 30))
    mask = np.zeros(img.shape, np.float32)
    cv2.ellipse(mask, box[:2], box[2:], 0, 180, 360, 1.0, -1)
    img[mask > 0] = 0.03
    return (mask > 0).astype(np.uint8)


def _mediastinal_widening(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    s = a.size
    return _blob(img, (s // 2, int(s * 0.3), int(s * 0.09), int(s * 0.14)), 0.45, 0)


def _pleural_effusion(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = _lung(rng, a)
    mask = np.zeros(img.shape, np.float32)
    top = cy + ay // 3
    cv2.rectangle(mask, (cx - ax, top), (cx + ax, cy + ay), 1.0, -1)
    lung = np.zeros(img.shape, np.float32)
    _ellipse(lung, (cx, cy, ax, ay), 1.0)
    mask *= lung
    img[mask > 0] = 0.55
    return (mask > 0).astype(np.uint8)


def _nodule(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = _lung(rng, a)
    r = max(2, a.size // 40)
    x = int(cx + rng.uniform(-0.5, 0.5) * ax)
    y = int(cy + rng.uniform(-0.5, 0.5) * ay)
    return _blob(img, (x, y, r, r), 0.5, 0)


def _consolidation(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = _lung(rng, a)
    y = int(cy + rng.uniform(0.0, 0.4) * ay)
    return _blob(img, (cx, y, int(ax * 0.6), int(ay * 0.35)), 0.32, a.size / 60)


def _active_tuberculosis(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = _lung(rng, a)
    mask = np.zeros(img.shape, np.uint8)
    for _ in range(6):
        x = int(cx + rng.uniform(-0.6, 0.6) * ax)
        y = int(cy - ay * 0.6 + rng.uniform(-0.25, 0.25) * ay)
        r = max(1, a.size // 70)
        mask |= _blob(img, (x, y, r, r), 0.35, 0)
    return cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=max(1, a.size // 64))


def _advanced_tuberculosis(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = _lung(rng, a)
    box = (cx, cy - int(ay * 0.55), int(ax * 0.6), int(ay * 0.3))
    mask = _blob(img, box, 0.4, 0)
    r = max(2, a.size // 35)
    cv2.circle(img, (cx, box[1]), r, 0.12, -1)  # cavity
    return mask


def _atelectasis(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = _lung(rng, a)
    mask = np.zeros(img.shape, np.float32)
    y = cy + ay // 2
    cv2.line(
        mask,
        (cx - int(ax * 0.7), y - ay // 8),
        (cx + int(ax * 0.7), y + ay // 8),
        1.0,
        max(1, a.size // 45),
    )
    img += 0.35 * mask
    return (mask > 0).astype(np.uint8)


def _support_device(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    s = a.size
    mask = np.zeros(img.shape, np.float32)
    x = int(s * (0.5 + rng.uniform(-0.03, 0.03)))
    cv2.line(mask, (x, 0), (x + s // 20, int(s * 0.6)), 1.0, max(1, s // 120))
    cv2.rectangle(mask, (int(s * 0.2), int(s * 0.15)), (int(s * 0.26), int(s * 0.2)), 1.0, -1)
    img[mask > 0] = 0.95
    return (mask > 0).astype(np.uint8)


def _pleural_calcification(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = _lung(rng, a)
    mask = np.zeros(img.shape, np.float32)
    for k in range(3):
        angle = rng.uniform(100, 260) if cx < a.size // 2 else rng.uniform(-80, 80)
        cv2.ellipse(mask, (cx, cy), (ax, ay), 0, angle, angle + 18, 1.0, max(1, a.size // 50))
        del k
    img[mask > 0] = 0.9
    return (mask > 0).astype(np.uint8)


def _interstitial_opacity(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    mask = np.zeros(img.shape, np.float32)
    lungs = np.zeros(img.shape, np.float32)
    for lung in (a.left_lung, a.right_lung):
        _ellipse(lungs, lung, 1.0)
    step = max(3, a.size // 24)
    grid = np.zeros(img.shape, np.float32)
    for k in range(0, a.size, step):
        cv2.line(grid, (k, 0), (k + step, a.size), 1.0, 1)
        cv2.line(grid, (0, k), (a.size, k + step // 2), 1.0, 1)
    img += 0.18 * grid * lungs
    mask[lungs > 0] = 1.0
    return (mask > 0).astype(np.uint8)


def _cardiomegaly(rng: np.random.Generator, img: np.ndarray, a: _Anatomy) -> np.ndarray:
    cx, cy, ax, ay = a.heart
    box = (cx - ax // 4, cy, int(ax * 1.7), int(ay * 1.5))
    mask = np.zeros(img.shape, np.float32)
    _ellipse(mask, box, 1.0)
    img[mask > 0] = 0.62
    return (mask > 0).astype(np.uint8)


PATTERNS: dict[str, Pattern] = {
    "pneumothorax": _pneumothorax,
    "pneumoperitoneum": _pneumoperitoneum,
    "mediastinal_widening": _mediastinal_widening,
    "pleural_effusion": _pleural_effusion,
    "nodule": _nodule,
    "consolidation": _consolidation,
    "active_tuberculosis": _active_tuberculosis,
    "advanced_tuberculosis": _advanced_tuberculosis,
    "atelectasis": _atelectasis,
    "support_device": _support_device,
    "pleural_calcification": _pleural_calcification,
    "interstitial_opacity": _interstitial_opacity,
    "cardiomegaly": _cardiomegaly,
}
assert set(PATTERNS) == set(THESIS_CATALOGUE.names)


def synthesise_case(
    rng: np.random.Generator, size: int, present: Sequence[str], findings: Sequence[str]
) -> SyntheticCase:
    """One image of `size` px with the `present` findings drawn, labels for all `findings`."""
    unknown = sorted(set(present) - set(PATTERNS))
    if unknown:
        raise ValueError(f"no synthetic pattern for findings {unknown}")
    anatomy = _anatomy(rng, size)
    img = _base_image(rng, anatomy)
    masks = {name: PATTERNS[name](rng, img, anatomy) for name in present}
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    # Random exposure: a different linear mapping to 12-bit stored values per image.
    gain = rng.uniform(2000, 3600)
    offset = rng.uniform(50, 400)
    pixels = np.clip(img * gain + offset, 0, 4095).astype(np.uint16)
    return SyntheticCase(
        pixels=pixels,
        labels={name: int(name in present) for name in findings},
        masks={name: masks[name] for name in present},
    )


def synthesise_cases(
    count: int,
    size: int,
    seed: int = 0,
    findings: Sequence[str] = tuple(THESIS_CATALOGUE.names),
    normal_fraction: float = 0.4,
) -> list[SyntheticCase]:
    """`count` cases: about `normal_fraction` normal, the rest with one or two findings each."""
    if count < 1 or size < 32:
        raise ValueError("synthesise_cases needs count >= 1 and size >= 32")
    rng = np.random.default_rng(seed)
    cases = []
    names = list(findings)
    for i in range(count):
        if rng.random() < normal_fraction:
            present: list[str] = []
        else:
            # Cycle through findings so that every one appears even in small sets.
            first = names[i % len(names)]
            present = [first]
            if rng.random() < 0.3 and len(names) > 1:
                second = names[int(rng.integers(len(names)))]
                if second != first:
                    present.append(second)
        cases.append(synthesise_case(rng, size, present, names))
    return cases


def write_synthetic_dataset(
    out_dir: str | Path,
    count: int,
    size: int,
    seed: int = 0,
    findings: Sequence[str] = tuple(THESIS_CATALOGUE.names),
    weak_fraction: float = 0.25,
    normal_fraction: float = 0.4,
) -> Path:
    """Write `count` synthetic cases as 16-bit PNG images, PNG lesion masks (hard-label rows
    only) and a manifest at out_dir/manifest.csv; some patients have two images."""
    from training.dataset import ManifestRow, write_manifest

    if not 0 <= weak_fraction <= 1:
        raise ValueError("weak_fraction must be in [0, 1]")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    cases = synthesise_cases(count, size, seed, findings, normal_fraction)
    rng = np.random.default_rng([seed, 1])
    rows = []
    patient = 0
    for i, case in enumerate(cases):
        if i > 0 and rng.random() < 0.75:
            patient += 1  # about one patient in four has a second image
        image = f"images/case_{i:05d}.png"
        cv2.imwrite(str(out / image), case.pixels)
        kind = "weak" if rng.random() < weak_fraction else "hard"
        masks = {}
        if kind == "hard":
            for name, mask in case.masks.items():
                rel = f"masks/case_{i:05d}.{name}.png"
                cv2.imwrite(str(out / rel), mask.astype(np.uint8) * 255)
                masks[name] = rel
        rows.append(
            ManifestRow(
                image=image,
                patient_id=f"SYN{patient:05d}",
                labels=dict(case.labels),
                label_kind=kind,
                masks=masks,
            )
        )
    return write_manifest(out / "manifest.csv", rows, list(findings))
