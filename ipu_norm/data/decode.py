"""Image files to uint8 tensors: crop-aware libjpeg-turbo decoding for JPEGs, Pillow for everything else.

An :class:`EncodedImage` holds a file's bytes and decodes on demand only the region a transform asks for:

- JPEG with the small C helper (``csrc/jpeg_region.c``, built at first use against the system's libjpeg-turbo,
  with a clear fallback): only the crop's rows and (iMCU-aligned) columns go through the IDCT and
  colour conversion, optionally DCT-downscaled by M/8 when the crop is much larger than the output.
- JPEG without the helper (no C compiler or no ``jpeglib.h``): torchvision's
  ``decode_jpeg`` (libjpeg-turbo too) decodes the whole image, then the region is sliced out.
- Anything else (PNG, GIF, 16-bit, CMYK JPEG, a JPEG that does not end with its EOI marker, a JPEG either
  decoder rejects): :func:`ipu_norm.data.datasets.load_rgb` (Pillow), so unreadable files raise what Pillow raises
  and the corrupt-file policy of :class:`~ipu_norm.data.datasets.SafeImageFolder` is unchanged.

All paths return ``(3, H, W)`` uint8 RGB tensors (a channels-last view: what torch's uint8 resize is fastest on).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch

from ipu_norm.core.build import build_once, cache_dir

_SRC = Path(__file__).with_name("csrc") / "jpeg_region.c"
_CFLAGS = ("-O2", "-fPIC", "-shared")
_MSG_LEN = 200
JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"


class ImageDecodeError(OSError):
    """A file no decoder could read (an ``OSError``, like Pillow's own errors, so callers catch one family)."""


def _build(out: Path) -> None:
    """Compile the helper into ``out`` and record beside it (``.libjpeg``) the libjpeg its header belongs to."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found")
    found = subprocess.run([cc, "-print-file-name=libjpeg.so"], check=True, capture_output=True, text=True)
    libjpeg = os.path.realpath(found.stdout.strip())
    if not os.path.isabs(found.stdout.strip()) or not os.path.exists(libjpeg):
        raise RuntimeError("the C compiler finds no libjpeg.so")

    def compile_into(tmp: Path) -> None:
        subprocess.run([cc, *_CFLAGS, str(_SRC), "-o", str(tmp / out.name), "-ldl"], check=True, capture_output=True)
        (tmp / (out.name + ".libjpeg")).write_text(libjpeg)

    build_once(out, compile_into)  # the side file first, the library last: loaders never miss the path


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    """The region decoder, built once per source version into ``core.build.cache_dir()`` (None when unavailable)."""
    if os.name != "posix":
        return None
    tag = hashlib.sha256(_SRC.read_bytes() + " ".join(_CFLAGS).encode() + os.uname().machine.encode()).hexdigest()
    path = cache_dir() / f"jpeg_region-{tag[:16]}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
        lib.jpeg_region_init.argtypes = [ctypes.c_char_p]
        libjpeg = path.with_name(path.name + ".libjpeg").read_text()
        rc = lib.jpeg_region_init(libjpeg.encode())
        if rc != 0:
            raise RuntimeError(f"{libjpeg} " + ("cannot be loaded" if rc == 1 else "is not libjpeg-turbo >= 1.5"))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace").strip().splitlines()[-1:] if hasattr(exc, "stderr") else []
        warnings.warn(
            f"ipu_norm's crop-aware JPEG decoder is unavailable ({exc}{': ' + detail[0] if detail else ''}; it needs "
            "a C compiler and libjpeg-turbo's headers, e.g. apt install libjpeg-dev); decoding whole JPEGs with "
            "torchvision instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    ptr, c_int = ctypes.c_void_p, ctypes.c_int
    lib.jpeg_region_info.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ptr, ctypes.c_char_p, c_int]
    lib.jpeg_region_decode.argtypes = [ctypes.c_char_p, ctypes.c_ulong, *[c_int] * 5, ptr, ptr, ctypes.c_char_p, c_int]
    lib.jpeg_region_info.restype = lib.jpeg_region_decode.restype = c_int
    return lib


def region_decoder_available() -> bool:
    """Whether the crop-aware JPEG decoder is in use (else whole-image decoding with torchvision)."""
    return _lib() is not None


def dct_scale_for(box_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """The smallest M in 1..8 with ``box * M / 8 >= 2 * out`` in both dimensions (8: no DCT downscaling).

    The region decoded at M/8 stays at least twice the output, so the antialiased resize that follows still does
    a 2x or larger reduction: measured on the benchmark's photos, a 1x margin sped decoding up more but moved the
    pixels ~3x further from an all-resize result. At ImageNet sizes (crops of ~100-500 px to 224) M is 8: the
    decode is exact; at small outputs (16-64 px) it saves much of the IDCT (1.3-1.6x faster at 16-32 px).
    """
    (bh, bw), (oh, ow) = box_hw, out_hw
    m = max(-(-16 * oh // bh), -(-16 * ow // bw))  # ceil(8 * 2 * out / box)
    return min(max(m, 1), 8)


def _scaled(v: int, m: int) -> int:
    """libjpeg's size of ``v`` pixels decoded at M/8 (``jdiv_round_up(v * M, 8)``)."""
    return -(-v * m // 8)


class EncodedImage:
    """One image file's bytes; decodes the requested region on demand (see the module docstring).

    Args:
        path: the file (read now, once).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self.data = f.read()
        self._full: torch.Tensor | None = None
        self._hw: tuple[int, int] | None = None
        self._jpeg = self.data[:3] == JPEG_MAGIC and self.data.rstrip(b"\0\r\n ")[-2:] == _JPEG_EOI
        if self._jpeg and _lib() is not None:
            info = (ctypes.c_int * 4)()
            msg = ctypes.create_string_buffer(_MSG_LEN)
            if _lib().jpeg_region_info(self.data, len(self.data), info, msg, _MSG_LEN) == 0 and info[2] in (1, 3):
                self._hw = (int(info[1]), int(info[0]))
            else:
                self._jpeg = False  # CMYK/YCCK or a header libjpeg rejects: Pillow decides

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the image."""
        if self._hw is None:
            self._hw = tuple(self._decode_full().shape[-2:])  # type: ignore[assignment]
        return self._hw

    def _decode_full(self) -> torch.Tensor:
        if self._full is None:
            image = None
            if self._jpeg:
                image = _torchvision_jpeg(self.data)
            if image is None:
                image = _pil_rgb(self.path)
            self._full = image
        return self._full

    def region(
        self, top: int, left: int, height: int, width: int, out_hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The box ``[top, top + height) x [left, left + width)`` as ``(3, h, w)`` uint8.

        With ``out_hw`` (the size the caller resizes the region to), a JPEG box much larger than that is decoded
        DCT-downscaled by M/8 (:func:`dct_scale_for`), so ``(h, w)`` lies between ``out_hw`` and the box size;
        the scaled box is the smallest whole-pixel box covering the original one.
        """
        h_img, w_img = self.size
        if not (0 <= top and 0 <= left and 0 < height and 0 < width and top + height <= h_img
                and left + width <= w_img):
            raise ValueError(f"region {(top, left, height, width)} outside the {h_img}x{w_img} image {self.path}")
        lib = _lib() if self._jpeg and self._full is None else None
        if lib is not None:
            m = 8 if out_hw is None else dct_scale_for((height, width), out_hw)
            sh, sw = _scaled(h_img, m), _scaled(w_img, m)
            y0, x0 = top * m // 8, left * m // 8
            y1, x1 = min(_scaled(top + height, m), sh), min(_scaled(left + width, m), sw)
            out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
            dims = (ctypes.c_int * 2)()
            msg = ctypes.create_string_buffer(_MSG_LEN)
            rc = lib.jpeg_region_decode(self.data, len(self.data), m, x0, y0, x1 - x0, y1 - y0, out.ctypes.data, dims,
                                        msg, _MSG_LEN)
            if rc == 0:
                return torch.from_numpy(out).permute(2, 0, 1)
            self._jpeg = False  # libjpeg rejected the data: fall through to a full decode (Pillow has the last word)
        return self._decode_full()[:, top : top + height, left : left + width]


def _torchvision_jpeg(data: bytes) -> torch.Tensor | None:
    """Whole-image libjpeg-turbo decode with torchvision (None when it fails: Pillow then decides)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


def _pil_rgb(path: str) -> torch.Tensor:
    """Pillow decode through ``load_rgb`` (every mode to 8-bit RGB) as a ``(3, H, W)`` channels-last uint8 view."""
    from .datasets import load_rgb

    return torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)
