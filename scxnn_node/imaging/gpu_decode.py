"""JPEG and JPEG 2000 decoding on the GPU through nvImageCodec, as a pydicom decoding plugin.

Optional: where `nvidia-nvimgcodec-cu13` is installed and a worker runs on a CUDA device, each
decode process calls `enable_gpu_decoding(device_index)` once. `decode_pixels`
(imaging/decode.py) then asks this plugin first for the transfer syntaxes below and falls back
to the CPU plugins (pylibjpeg) when it refuses or fails, so an image the GPU cannot decode is
still decoded on the CPU. Only what the CPU path would give is returned: grayscale, unsigned,
the dataset's own rows and columns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import uid

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.pixels.decoders.base import DecodeRunner

log = logging.getLogger(__name__)

PLUGIN = "nvimgcodec"
GPU_SYNTAXES = frozenset(
    {
        uid.JPEGBaseline8Bit,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
        uid.HTJ2K,
    }
)
# pydicom asks a plugin module for these two names (pydicom.pixels.common.CoderBase.add_plugin).
DECODER_DEPENDENCIES = {syntax: ("nvidia-nvimgcodec-cu13",) for syntax in GPU_SYNTAXES}

_decoder: Any = None  # nvimgcodec.Decoder once enabled in this process
_params: Any = None
_code_stream: Callable[[bytes], Any] = bytes  # nvimgcodec.CodeStream once enabled


def is_available(transfer_syntax: str) -> bool:
    return _decoder is not None and transfer_syntax in GPU_SYNTAXES


def accepts(ds: Dataset, transfer_syntax: str) -> bool:
    """Whether decode_pixels should try the GPU first for this dataset: enabled here, a listed
    transfer syntax, unsigned grayscale (what the plugin hands back exactly as the CPU would)."""
    return (
        is_available(transfer_syntax)
        and int(ds.get("PixelRepresentation", 0) or 0) == 0
        and int(ds.get("SamplesPerPixel", 1) or 1) == 1
    )


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom's plugin call: one encoded frame -> its pixels as bytes, in pydicom's layout."""
    if runner.samples_per_pixel != 1 or runner.pixel_representation != 0:
        raise ValueError("GPU decoding here covers unsigned grayscale only")
    image = _decoder.decode(_code_stream(bytes(src)), params=_params)
    if image is None:
        raise ValueError("nvImageCodec could not decode the frame")
    pixels = np.asarray(image.cpu())
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.shape != (runner.rows, runner.columns):
        raise ValueError(f"decoded shape {pixels.shape} differs from the dataset's")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"decoded sample type {pixels.dtype} is not 8 or 16 bit unsigned")
    # As pylibjpeg's plugin does: the container follows the decoded precision.
    runner.set_option("bits_allocated", pixels.dtype.itemsize * 8)
    return np.ascontiguousarray(pixels).tobytes()


def enable_gpu_decoding(device_index: int) -> bool:
    """Decode JPEG / JPEG 2000 on CUDA device `device_index` in this process, if nvImageCodec
    is installed and the device answers; False (CPU decoding) otherwise."""
    global _decoder, _params, _code_stream
    if _decoder is not None:
        return True
    try:
        from nvidia import nvimgcodec
        from pydicom.pixels import get_decoder

        # GPU backends only: left to choose, nvImageCodec may decode JPEG 2000 with its own CPU
        # codec, silently, at the CPU's cost (a 2500 px 12-bit lossless frame: about a CPU
        # second; measured on an H200 node, README "On a GPU"). A frame the GPU refuses goes to
        # our CPU path instead, which says so. One CPU thread: this is one of several decode
        # processes, and each nvImageCodec decoder would start a thread per core.
        _decoder = nvimgcodec.Decoder(
            device_id=device_index,
            max_num_cpu_threads=1,
            backends=[
                nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY),
                nvimgcodec.Backend(nvimgcodec.BackendKind.HYBRID_CPU_GPU),
            ],
        )
        _code_stream = nvimgcodec.CodeStream
        _params = nvimgcodec.DecodeParams(
            color_spec=nvimgcodec.ColorSpec.UNCHANGED,
            allow_any_depth=True,
            apply_exif_orientation=False,
        )
        for syntax in GPU_SYNTAXES:
            get_decoder(syntax).add_plugin(PLUGIN, (__name__, "decode_frame"))
    except Exception as exc:  # not installed, no driver, no device: the CPU decodes
        disable_gpu_decoding()
        log.info("GPU decoding off (%s: %s); decoding on the CPU", type(exc).__name__, exc)
        return False
    log.info("GPU decoding on with nvImageCodec, CUDA device %d", device_index)
    return True


def disable_gpu_decoding() -> None:
    """Back to CPU decoding only in this process."""
    global _decoder, _params, _code_stream
    from pydicom.pixels import get_decoder

    for syntax in GPU_SYNTAXES:
        with contextlib.suppress(ValueError):  # not registered for this syntax
            get_decoder(syntax).remove_plugin(PLUGIN)
    _decoder = _params = None
    _code_stream = bytes
