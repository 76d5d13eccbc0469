"""The thesis's preprocessing (preprocess.py) in torch on a device, for the decode processes of
a GPU worker: the same steps, and OpenCV's CLAHE and area resize redone operation for
operation, so the same pixels bit for bit (tested against OpenCV on the CPU's torch, and on
CUDA by bench/gpu_session.sh).

Why: on a GPU node the decode processes are the bound (README "On a GPU"), and of an
instance's CPU time beside a GPU decode, CLAHE on the full padded image and the area resize
are most. Here they cost the CPU a copy to the device and about a hundred kernel launches.
Each step keeps OpenCV's float32 operations in OpenCV's order, one torch operation each (no
fusing, which could contract a multiply and an add and round differently).
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch

from scxnn_node.imaging.preprocess import (
    PreprocessSpec,
    integer_window,
    preprocess_with_windowed_mean,
    require_grayscale,
    resized_to_spec,
    square_padding,
    windowed_with_mean,
)
from scxnn_node.logs import exception_line

log = logging.getLogger(__name__)

_HISTOGRAM_BINS = 256  # uint8 images: OpenCV's histSize
_BLOCK_PIXELS = 1 << 20
# A decode process's share of the device. What an image needs, counted from the tensors held at
# once (bench/preprocess.py --device cuda:0 prints the peak): about 0.1 GiB at 3000 px and
# 0.6 GiB at 8192 px, the largest side decode.py accepts; beyond the share an image goes to
# the CPU.
DEVICE_MEMORY_BYTES = 1 << 30
_failed_on: set[str] = set()  # devices that failed in this process (logged once each)


def preprocess_or_fall_back(
    pixels: np.ndarray, spec: PreprocessSpec, device: str
) -> tuple[np.ndarray, float]:
    """`preprocess_on_device`, or the CPU's `preprocess_with_windowed_mean` where the device
    cannot: the same pixels either way, so a device fault costs time, never an instance. Out
    of memory (an image beyond this process's share of the device) sends that image to the
    CPU; any other failure (a lost device) the rest of this process's images."""
    if device in _failed_on or pixels.ndim != 2:  # the CPU path names a wrong shape
        return preprocess_with_windowed_mean(pixels, spec)
    try:
        return preprocess_on_device(pixels, spec, device)
    except MemoryError:
        raise
    except torch.cuda.OutOfMemoryError:
        log.warning(
            "preprocessing a %dx%d image on %s: out of this process's device memory; that "
            "image on the CPU",
            *pixels.shape,
            device,
        )
        torch.cuda.empty_cache()
    except Exception as exc:
        _failed_on.add(device)
        log.warning(
            "preprocessing on %s failed (%s); preprocessing on the CPU in this process",
            device,
            exception_line(exc),
        )
    return preprocess_with_windowed_mean(pixels, spec)


def warm_up(device: str) -> None:
    """Start `device` before the first instance waits for it (a CUDA context takes seconds),
    and hold this process to DEVICE_MEMORY_BYTES of it: the engine shares the device with
    several decode processes, and each one's cache keeps what its largest image took. For
    decode processes only (the cap is the whole process's; a worker preprocessing inline does
    not call it). Never raises (it runs as a decode process starts): a device that cannot
    start is not used."""
    try:
        if torch.device(device).type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            share = min(1.0, DEVICE_MEMORY_BYTES / total)
            torch.cuda.set_per_process_memory_fraction(share, device)
    except Exception as exc:
        _failed_on.add(device)
        log.warning(
            "preprocessing device %s did not start (%s); preprocessing on the CPU",
            device,
            exception_line(exc),
        )
        return
    tiny = np.arange(64, dtype=np.uint16).reshape(8, 8)
    preprocess_or_fall_back(tiny, PreprocessSpec(size=32), device)


def preprocess_on_device(
    pixels: np.ndarray, spec: PreprocessSpec, device: torch.device | str
) -> tuple[np.ndarray, float]:
    """`preprocess_with_windowed_mean`, computed on `device`: the same image and mean."""
    require_grayscale(pixels)
    device = torch.device(device)
    unpadded, windowed_mean = _windowed_on_device(np.asarray(pixels), spec, device)
    height, width = unpadded.shape
    top, bottom, left, right = square_padding(height, width)
    square = torch.zeros(
        (height + top + bottom, width + left + right), dtype=torch.uint8, device=device
    )
    square[top : top + height, left : left + width] = unpadded
    equalised = clahe_as_opencv(square, spec.clahe_clip_limit, spec.clahe_tile_grid)
    side = equalised.shape[0]
    if spec.interpolation == "area" and side > spec.size:
        return resize_area_as_opencv(equalised, spec.size).cpu().numpy(), windowed_mean
    # The same size, an upscale (small, rare) or another interpolation: OpenCV on the host.
    return resized_to_spec(equalised.cpu().numpy(), spec), windowed_mean


def _windowed_on_device(
    values: np.ndarray, spec: PreprocessSpec, device: torch.device
) -> tuple[torch.Tensor, float]:
    """The windowed uint8 image on `device`, and its mean. Integers over at most 16 bits (what
    radiographs hold) are windowed there through `integer_window`'s lookup table; anything
    else (fractions after a rescale) on the host, as the CPU path does."""
    if values.dtype.kind not in "iu" or values.size == 0:
        windowed, mean = windowed_with_mean(values, spec)
        return torch.from_numpy(windowed).to(device), mean
    image = _integers_on_device(values, device)
    lowest, highest = (int(v) for v in torch.aminmax(image))
    if highest - lowest >= 1 << 16:
        windowed, mean = windowed_with_mean(values, spec)
        return torch.from_numpy(windowed).to(device), mean
    offsets = (image - lowest).to(torch.int32)
    del image  # the device memory a decode process holds is its largest image's
    counts = torch.bincount(offsets.reshape(-1), minlength=highest - lowest + 1)
    lookup, mean = integer_window(counts.cpu().numpy(), float(lowest), spec)
    return torch.from_numpy(lookup).to(device)[offsets], mean


def _integers_on_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """The image as int32 on `device` (int64 for 32-bit stored values). 16-bit unsigned
    travels as its own 2 bytes (viewed as int16, which every torch device handles) and is
    widened there."""
    if values.dtype == np.uint16:
        raw = torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).to(device)
        return raw.to(torch.int32).bitwise_and_(0xFFFF)
    if values.dtype.itemsize > 4 or values.dtype == np.uint32:  # rare: 32-bit stored values
        return torch.from_numpy(values.astype(np.int64)).to(device)
    return torch.from_numpy(np.ascontiguousarray(values)).to(device).to(torch.int32)


def _row_blocks(height: int, width: int) -> list[tuple[int, int]]:
    """Rows in blocks of about a million pixels: the temporaries of a step stay tens of MB
    whatever the image (each pixel's arithmetic is its own, so the result is the same)."""
    rows = max(1, _BLOCK_PIXELS // max(width, 1))
    return [(start, min(start + rows, height)) for start in range(0, height, rows)]


def clahe_as_opencv(image: torch.Tensor, clip_limit: float, tile_grid: int) -> torch.Tensor:
    """cv2.createCLAHE(clip_limit, (tile_grid, tile_grid)).apply(image) for a 2-D uint8 tensor.

    OpenCV's steps: where a side is not a multiple of the grid, histograms come from the image
    extended at the bottom and right by reflection (BORDER_REFLECT_101, by a full grid's worth
    on a side that divides); each tile's histogram is clipped at max(int(clip * area / 256), 1)
    and the excess handed out evenly, its remainder one count each to every (256 // remainder)-th
    bin from 0; each tile's lookup is its cumulative histogram * (255 / area) in float32,
    rounded half to even; each pixel blends its four nearest tiles' lookups bilinearly in
    float32 and rounds the same way."""
    device = image.device
    height, width = image.shape
    tiles = tile_grid
    if height % tiles or width % tiles:
        rows = _reflected_101(height, height + tiles - height % tiles, device)
        columns = _reflected_101(width, width + tiles - width % tiles, device)
        for_lookup = image[rows][:, columns]
    else:
        for_lookup = image
    tile_height, tile_width = for_lookup.shape[0] // tiles, for_lookup.shape[1] // tiles
    area = tile_height * tile_width

    tile_columns = (torch.arange(for_lookup.shape[1], device=device) // tile_width).to(torch.int32)
    histograms = torch.zeros(tiles * tiles * _HISTOGRAM_BINS, dtype=torch.int64, device=device)
    for start, end in _row_blocks(*for_lookup.shape):
        tile_rows = (torch.arange(start, end, device=device) // tile_height).to(torch.int32)
        tile_of_pixel = tile_rows[:, None] * tiles + tile_columns[None, :]
        keys = tile_of_pixel * _HISTOGRAM_BINS + for_lookup[start:end].to(torch.int32)
        histograms += torch.bincount(keys.reshape(-1), minlength=histograms.numel())
    histograms = histograms.reshape(tiles * tiles, _HISTOGRAM_BINS)

    limit = max(int(float(clip_limit) * area / _HISTOGRAM_BINS), 1)
    excess = (histograms - limit).clamp(min=0).sum(dim=1, keepdim=True)
    batch = excess // _HISTOGRAM_BINS
    remainder = excess - batch * _HISTOGRAM_BINS
    histograms = histograms.clamp(max=limit) + batch
    bins = torch.arange(_HISTOGRAM_BINS, device=device)[None, :]
    step = (_HISTOGRAM_BINS // remainder.clamp(min=1)).clamp(min=1)
    one_more = (remainder > 0) & (bins % step == 0) & (bins // step < remainder)
    histograms = histograms + one_more.to(histograms.dtype)
    scale = np.float32(_HISTOGRAM_BINS - 1) / np.float32(area)
    lookups = _rounded_uint8(torch.cumsum(histograms, dim=1).to(torch.float32) * float(scale))

    above, below, weight_below, weight_above = _blend_axis(height, tile_height, tiles, device)
    left, right, weight_right, weight_left = _blend_axis(width, tile_width, tiles, device)
    flat = lookups.to(torch.float32).reshape(-1)
    out = torch.empty_like(image)
    for start, end in _row_blocks(height, width):
        values = image[start:end].to(torch.int32)
        top, bottom = above[start:end], below[start:end]
        upper = (
            _looked_up(flat, tiles, top, left, values) * weight_left
            + _looked_up(flat, tiles, top, right, values) * weight_right
        )
        lower = (
            _looked_up(flat, tiles, bottom, left, values) * weight_left
            + _looked_up(flat, tiles, bottom, right, values) * weight_right
        )
        blended = upper * weight_above[start:end, None] + lower * weight_below[start:end, None]
        out[start:end] = _rounded_uint8(blended)
    return out


def _looked_up(
    lookups: torch.Tensor,
    tiles: int,
    tile_rows: torch.Tensor,
    tile_columns: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """Each pixel's value through the lookup of its tile (one row and one column per pixel)."""
    tile = tile_rows[:, None] * tiles + tile_columns[None, :]
    return lookups[tile * _HISTOGRAM_BINS + values]


def _reflected_101(size: int, extended: int, device: torch.device) -> torch.Tensor:
    """Indices 0..extended-1 into an axis of `size`, mirrored past its end without repeating
    the edge (OpenCV's BORDER_REFLECT_101), as often as needed."""
    index = torch.arange(extended, device=device)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    folded = index % period
    return torch.where(folded >= size, period - folded, folded)


def _blend_axis(
    size: int, tile: int, tiles: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis: each pixel's nearer and farther tile and their float32 weights, as
    OpenCV computes them (position * (1 / tile) - 0.5, in float32)."""
    inverse = float(np.float32(1.0) / np.float32(tile))
    position = torch.arange(size, device=device, dtype=torch.float32) * inverse - 0.5
    first = torch.floor(position)
    weight = position - first
    first_tile = first.to(torch.int32)
    second_tile = (first_tile + 1).clamp(max=tiles - 1)
    return first_tile.clamp(min=0), second_tile, weight, 1.0 - weight


def _rounded_uint8(values: torch.Tensor) -> torch.Tensor:
    """OpenCV's saturate_cast<uchar> of a float: rounded half to even, clipped to 0..255."""
    return torch.round(values).clamp(0, 255).to(torch.uint8)


def resize_area_as_opencv(image: torch.Tensor, size: int) -> torch.Tensor:
    """cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) for a square 2-D uint8
    tensor larger than `size`.

    Whole-number ratios: OpenCV sums each block in integers and takes sum * (1 / area) in
    float32, rounded half to even; halving rounds half up ((sum + 2) >> 2, its vector path).
    Other ratios: each output pixel weighs the source pixels its cell covers (weights
    computed in float64, stored as float32); rows first, accumulated in source order in float32,
    then columns the same way."""
    side = image.shape[0]
    if image.shape != (side, side) or side <= size:
        raise ValueError(f"resize_area_as_opencv shrinks a square image, got {image.shape}")
    if side % size == 0:
        ratio = side // size
        sums = image.to(torch.int32).reshape(size, ratio, size, ratio).sum(dim=(1, 3))
        if ratio == 2:
            return ((sums + 2) >> 2).to(torch.uint8)
        scale = float(np.float32(1.0) / np.float32(ratio * ratio))
        return _rounded_uint8(sums.to(torch.float32) * scale)
    sources, weights = _area_cells(side, size)
    sources, weights = sources.to(image.device), weights.to(image.device)
    across = torch.zeros((side, size), dtype=torch.float32, device=image.device)
    for k in range(sources.shape[1]):  # padding entries weigh 0 and come last: no change
        across = across + image[:, sources[:, k]].to(torch.float32) * weights[:, k]
    out = torch.zeros((size, size), dtype=torch.float32, device=image.device)
    for k in range(sources.shape[1]):
        out = out + across[sources[:, k], :] * weights[:, k, None]
    return _rounded_uint8(out)


@functools.lru_cache(maxsize=64)  # a Python loop per output pixel: built once per size pair
def _area_cells(source: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of `size` output pixels along an axis of `source`: the source pixels its cell
    covers, in order, and their float32 weights (OpenCV's area table), padded with weight 0.
    Cached: read only."""
    scale = source / size
    cells: list[list[tuple[int, float]]] = []
    for out in range(size):
        start = out * scale
        end = start + scale
        width = min(scale, source - start)
        first, last = math.ceil(start), math.floor(end)
        last = min(last, source - 1)
        first = min(first, last)
        cell = []
        if first - start > 1e-3:
            cell.append((first - 1, (first - start) / width))
        cell += [(s, 1.0 / width) for s in range(first, last)]
        if end - last > 1e-3:
            cell.append((last, min(end - last, 1.0, width) / width))
        cells.append(cell)
    longest = max(len(cell) for cell in cells)
    sources = np.zeros((size, longest), dtype=np.int64)
    weights = np.zeros((size, longest), dtype=np.float32)
    for out, cell in enumerate(cells):
        for k, (s, weight) in enumerate(cell):
            sources[out, k], weights[out, k] = s, weight
    return torch.from_numpy(sources), torch.from_numpy(weights)
