"""Readers for the layouts echocardiography users have, all through SimpleITK (never nibabel).

Layouts (see :func:`detect_format`):

- ``camus2023``: the CAMUS NIfTI release, ``database_nifti/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}[_gt].nii.gz``,
  ``Info_{2CH,4CH}.cfg`` ("Key: value" lines) and ``database_split/subgroup_{training,validation,testing}.txt``.
- ``camus2019``: the CAMUS MHD release, ``training|testing/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}[_gt].mhd``
  with ``Info_*.cfg`` (keys ``LVedv``, ``LVesv``, ``LVef``).
- ``nnunet``: an nnU-Net v2 raw dataset (``dataset.json``, ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``,
  ``imagesTs/``), optionally with ``rl_adapt_meta.json`` (per-case metadata nnU-Net ignores) and
  ``splits*.json`` files of the form ``{"group": [case, ...]}`` (sets ``meta["split"]``).
- ``folder``: any mix of ``.nii.gz/.nii/.mhd/.mha/.nrrd/.png`` files, one 2D image each; ``X_gt.<ext>`` is taken
  as the label map of ``X.<ext>``.

Orientation: ``sitk.GetArrayFromImage`` returns (rows, cols), which for CAMUS is apex up (rows = depth).
Spacing is ``GetSpacing()`` reversed, i.e. (row, col) in mm. 2D images stored as 3D with a singleton
dimension are squeezed; a true 3D volume where a 2D image is expected is an :class:`InputError`.
uint8 images stay uint8; every other pixel type becomes float32.

What ITK hides is checked on the file's own bytes before ITK reads it (one read; no nibabel, the few header
fields needed are parsed here): ITK's NIfTI reader fills the pixel data missing from a cut file with zeros,
reads a pixdim of 0, < 0, NaN or Inf as 1 mm and turns NaN/Inf voxels into 0; its MetaImage reader reads a
negative ElementSpacing as positive and reports a cut ``.raw`` file as "No such file or directory". So a
NIfTI file (.nii, .nii.gz: gzip stream complete, CRC right, header size promise kept) and a MetaImage file
(.mhd with its data file, .mha: data size promise kept) are refused when truncated, and their header spacing
must lie in ``spacing_range`` (default :data:`~rl_adapt.data.validate.SPACING_RANGE`, 0.01 to 10 mm), as
must the spacing ITK reports for every other format. A ``dataset.json`` label mapping is honoured (see
:func:`nnunet_label_map`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from rl_adapt.data.case import LABEL_ALIASES, LABELS, Case
from rl_adapt.data.validate import (SPACING_RANGE, check_exists, check_image_array, check_label_array,
                                    check_not_empty, check_pair, check_spacing, check_spacing_range,
                                    check_spacing_values)
from rl_adapt.errors import InputError
from tqdm import tqdm

log = logging.getLogger(__name__)

FORMATS = ("camus2023", "camus2019", "nnunet", "folder")
"""Dataset layouts :func:`read_dataset` understands."""

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".png")
"""File endings the folder reader picks up (``.raw`` files are the data halves of ``.mhd`` headers)."""

CASE_RE = re.compile(r"^(?P<patient>patient\d+)_(?P<view>2CH|4CH)_(?P<phase>ED|ES)$")
"""CAMUS-style case names, e.g. ``patient0001_2CH_ED``."""

_INFO_KEYS = {
    "ED": "ed_frame", "ES": "es_frame", "NbFrame": "nb_frames", "Sex": "sex", "Age": "age",
    "ImageQuality": "quality", "EF": "EF", "LVef": "EF", "EDV": "EDV", "LVedv": "EDV", "ESV": "ESV",
    "LVesv": "ESV", "FrameRate": "frame_rate",
}
"""Info_*.cfg keys (2019 and 2023 releases) -> ``Case.meta`` keys."""

_SPLIT_NAMES = {"training": "training", "validation": "validation", "testing": "testing"}

N_WORKERS = 4
"""Threads used to read many files: the raw-file checks (decompression releases the GIL) and the numpy work run side
by side, SimpleITK's own reading one at a time (:data:`_ITK_LOCK`)."""


# ----------------------------------------------------------------------------------------------- files
def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suf in IMAGE_SUFFIXES:
        if name.endswith(suf):
            return suf
    return None


def _stem(path: Path) -> str:
    suf = _suffix(path)
    return path.name[: -len(suf)] if suf else path.stem


# ------------------------------------------------------------------------- raw checks (what ITK hides)
_GZIP_MAGIC = b"\x1f\x8b"

_NIFTI_TYPES: dict[int, tuple[str | None, int]] = {
    2: ("u1", 1), 4: ("i2", 2), 8: ("i4", 4), 16: ("f4", 4), 32: (None, 8), 64: ("f8", 8), 128: (None, 3),
    256: ("i1", 1), 512: ("u2", 2), 768: ("u4", 4), 1024: ("i8", 8), 1280: ("u8", 8), 1536: (None, 16),
    1792: (None, 16), 2048: (None, 32), 2304: (None, 4),
}
"""NIfTI datatype code -> (numpy type code, or None where numpy is not needed, bytes per voxel)."""

_NIFTI_MM_PER_UNIT = {1: 1000.0, 2: 1.0, 3: 0.001}
"""NIfTI ``xyzt_units`` spatial code (metre, mm, micron) -> mm per unit; other codes mean mm, as in ITK."""

_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}
"""MetaImage ElementType -> bytes per element (MetaIO's sizes: MET_LONG is 4 bytes)."""

_MET_HEADER_MAX = 1 << 16
"""Bytes of a MetaImage file searched for its header (which ends with the ElementDataFile line)."""


def _corrupt(path: Path, detail: str) -> InputError:
    return InputError(path, f"unreadable or corrupt image ({detail})")


def _gunzip(data: bytes, path: Path) -> bytes:
    """Decompress every gzip member of ``data``, checking each member's CRC and length.

    Bytes after the last complete member that do not start another member are ignored, as zlib readers do.
    :raises InputError: the compressed stream ends early (a cut file) or is damaged.
    """
    out = []
    while data[:2] == _GZIP_MAGIC:
        dec = zlib.decompressobj(wbits=31)
        try:
            out.append(dec.decompress(data))
        except zlib.error as exc:
            raise _corrupt(path, f"damaged compressed data: {exc}") from None
        if not dec.eof:
            raise _corrupt(path, "truncated: the compressed data ends before its end-of-stream marker")
        data = dec.unused_data
    return b"".join(out)


def _file_bytes(path: Path) -> bytes:
    """The whole content of ``path``, decompressed when it is a gzip stream."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
    return _gunzip(data, path) if data[:2] == _GZIP_MAGIC else data


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a NIfTI-1/2 header the checks need; axes in NIfTI order (x = columns, y = rows, z, t...)."""
    endian: str
    dims: tuple[int, ...]
    pixdim: tuple[float, ...]
    datatype: int
    vox_offset: float
    single_file: bool
    mm_per_unit: float = 1.0
    """Scale of the spatial pixdims to mm (ITK applies it too)."""

def _parse_nifti_header(raw: bytes) -> _NiftiHeader | None:
    """Parse a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header of either byte order; None if ``raw`` is neither."""
    for e in "<>":
        if len(raw) >= 348 and struct.unpack_from(e + "i", raw, 0)[0] == 348:
            dim = struct.unpack_from(e + "8h", raw, 40)
            datatype = struct.unpack_from(e + "h", raw, 70)[0]
            pixdim = struct.unpack_from(e + "8f", raw, 76)
            vox_offset = struct.unpack_from(e + "f", raw, 108)[0]
            units = raw[123]
            single = raw[344:347] == b"n+1"
            break
        if len(raw) >= 540 and struct.unpack_from(e + "i", raw, 0)[0] == 540:
            datatype = struct.unpack_from(e + "h", raw, 12)[0]
            dim = struct.unpack_from(e + "8q", raw, 16)
            pixdim = struct.unpack_from(e + "8d", raw, 104)
            vox_offset = struct.unpack_from(e + "q", raw, 168)[0]
            units = struct.unpack_from(e + "i", raw, 500)[0]
            single = raw[4:7] == b"n+2"
            break
    else:
        return None
    ndim = int(dim[0])
    if not 1 <= ndim <= 7:
        return None
    return _NiftiHeader(e, tuple(int(d) for d in dim[1:ndim + 1]), tuple(float(p) for p in pixdim[1:ndim + 1]),
                        int(datatype), float(vox_offset), single, _NIFTI_MM_PER_UNIT.get(units & 0x07, 1.0))


def _check_header_spacing(dims: Sequence[int], spacing: Sequence[float], path: Path,
                          spacing_range: Sequence[float]) -> None:
    """Check the in-plane spacing a header states, before ITK substitutes anything for bad values.

    :param dims: image size per axis in file order (x = columns, y = rows, ...).
    :param spacing: spacing per axis in the same order, mm; only x and y with more than one pixel are checked
        (a third axis may be time in a 2D+t file).
    """
    inplane = [float(sp) for n, sp in zip(dims[:2], spacing[:2]) if n > 1]
    check_spacing_values(inplane[::-1], path, spacing_range, "header pixel spacing (row x col)")


def _check_nifti(path: Path, spacing_range: Sequence[float]) -> int:
    """Refuse a cut or damaged NIfTI file or one with implausible spacing; count its NaN/Inf voxels.

    One read of the (decompressed) bytes serves all three checks.
    :returns: the number of NaN/Inf voxels (0 unless the voxels are float32/float64).
    :raises InputError: truncated/damaged data, or header spacing outside ``spacing_range``.
    """
    raw = _file_bytes(path)
    hdr = _parse_nifti_header(raw)
    if hdr is None:
        return 0  # not a NIfTI header: ITK decides (and refuses garbage)
    dtype, nbytes = _NIFTI_TYPES.get(hdr.datatype, (None, 0))
    nvox = math.prod(hdr.dims) if all(d > 0 for d in hdr.dims) else 0
    known = hdr.single_file and nbytes and nvox and math.isfinite(hdr.vox_offset) and hdr.vox_offset >= 0
    offset = int(hdr.vox_offset) if known else 0
    if known and len(raw) - offset < nvox * nbytes:
        raise _corrupt(path, f"truncated: the header promises {nvox * nbytes} bytes of pixel data, "
                             f"the file holds {max(len(raw) - offset, 0)}")
    _check_header_spacing(hdr.dims, [p * hdr.mm_per_unit for p in hdr.pixdim], path, spacing_range)
    if not known or dtype is None or dtype[0] != "f":
        return 0
    data = np.frombuffer(raw, hdr.endian + dtype, count=nvox, offset=offset)
    return int(np.count_nonzero(~np.isfinite(data)))


def _metaimage_header(path: Path) -> tuple[dict[str, str], int] | None:
    """``Key = value`` fields of a MetaImage header up to ElementDataFile (its last field) and the header's
    length in bytes; None when no ElementDataFile line is found (ITK then decides)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MET_HEADER_MAX)
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(head):
        nl = head.find(b"\n", pos)
        end = len(head) if nl < 0 else nl + 1
        key, sep, value = head[pos:end].decode("latin-1").partition("=")
        pos = end
        if sep:
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return fields, pos
    return None


def _numbers(text: str | None, kind: type, path: Path, key: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split()]
    except ValueError:
        raise InputError(path, f"header field {key} = {text!r} is not a list of numbers") from None


def _check_metaimage_size(path: Path, fields: dict[str, str], header_len: int, dims: Sequence[int]) -> None:
    """Refuse a MetaImage whose pixel data (in the data file, or after the header for LOCAL) is cut short."""
    name = fields["ElementDataFile"]
    elem = _MET_BYTES.get(fields.get("ElementType", ""))
    channels = _numbers(fields.get("ElementNumberOfChannels", "1"), int, path, "ElementNumberOfChannels")
    binary = fields.get("BinaryData", "True").lower() in ("true", "1")
    if not binary or elem is None or not channels or name.upper().startswith("LIST") or "%" in name:
        return  # ASCII data, unknown types, file lists and patterns: ITK decides
    local = name.upper() == "LOCAL"
    data_path = path if local else path.parent / name
    if not data_path.is_file():
        raise InputError(data_path, f"pixel data file named by {path.name} not found")
    skip = (header_len if local else 0) + max(0, (_numbers(fields.get("HeaderSize", "0"), int, path,
                                                           "HeaderSize") or [0])[0])
    found = data_path.stat().st_size - skip
    if fields.get("CompressedData", "False").lower() in ("true", "1"):
        csize = _numbers(fields.get("CompressedDataSize"), int, path, "CompressedDataSize")
        if not csize:
            return
        need, what = csize[0], "compressed pixel data"
    else:
        need, what = math.prod(dims) * channels[0] * elem, "pixel data"
    if found < need:
        raise _corrupt(data_path, f"truncated: {'the header' if local else path.name} promises {need} bytes of "
                                  f"{what}, the file holds {max(found, 0)}")


def _check_metaimage(path: Path, spacing_range: Sequence[float]) -> None:
    """Refuse a MetaImage (.mhd + data file, .mha) with implausible header spacing or cut pixel data."""
    parsed = _metaimage_header(path)
    if parsed is None:
        return
    fields, header_len = parsed
    dims = _numbers(fields.get("DimSize"), int, path, "DimSize")
    if not dims or any(n <= 0 for n in dims):
        return
    spacing = _numbers(fields.get("ElementSpacing", fields.get("ElementSize")), float, path, "ElementSpacing")
    if spacing is not None:
        _check_header_spacing(dims, spacing, path, spacing_range)
    _check_metaimage_size(path, fields, header_len, dims)


def _precheck(path: Path, spacing_range: Sequence[float]) -> int:
    """Raw-file checks ITK cannot be trusted with; returns the NaN/Inf voxel count ITK would hide (NIfTI)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _check_nifti(path, spacing_range)
    if name.endswith((".mhd", ".mha")):
        _check_metaimage(path, spacing_range)
    return 0


_ITK_LOCK = threading.Lock()
"""Serialises SimpleITK's reading: concurrent ``ReadImage`` calls from several threads can corrupt the heap
(seen here as a rare ``double free or corruption`` abort when :func:`_load_many` started; SimpleITK issues #74 and
#805). The checks and the numpy work around a read still run side by side."""


def _read_array(path: str | Path, spacing_range: Sequence[float] = SPACING_RANGE
                ) -> tuple[np.ndarray, tuple[float, ...], int]:
    """Check the raw file (:func:`_precheck`), then read it with SimpleITK (one thread at a time).

    :returns: ``(array, spacing, n_nonfinite)``: the voxels in numpy (z, y, x) order (colour images made grey), the
        spacing in the same order (mm), and the number of NaN/Inf voxels ITK's reader zeroed.
    """
    path = check_exists(path)
    if path.is_dir():
        raise InputError(path, "expected an image file, found a folder")
    nonfinite = _precheck(path, spacing_range)
    with _ITK_LOCK:
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = next((ln.strip() for ln in first if "rror" in ln or "annot" in ln), first[-1] if first else "")
            raise _corrupt(path, detail[:160]) from None
        arr = sitk.GetArrayFromImage(img)
        spacing = tuple(float(s) for s in img.GetSpacing()[::-1])
        components = img.GetNumberOfComponentsPerPixel()
        del img  # freed under the lock too
    return _grey(arr, components), spacing, nonfinite


def _grey(arr: np.ndarray, components: int) -> np.ndarray:
    """A colour image (``components`` > 1, channels last) as grey; a grey one unchanged."""
    if components <= 1:
        return arr
    chans = arr[..., :3].astype(np.float32)
    if chans.shape[-1] >= 3 and not (np.array_equal(arr[..., 0], arr[..., 1])
                                     and np.array_equal(arr[..., 0], arr[..., 2])):
        grey = chans @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        grey = chans[..., 0]
    return np.clip(np.round(grey), 0, 255).astype(np.uint8) if arr.dtype == np.uint8 else grey


def _squeeze(arr: np.ndarray, spacing: Sequence[float], path: Path, ndim: int) -> tuple[np.ndarray, tuple]:
    """Drop singleton axes; raise when more than ``ndim`` real dimensions remain."""
    keep = [i for i, n in enumerate(arr.shape) if n != 1]
    if arr.ndim > ndim and len(keep) <= ndim:
        keep = keep if len(keep) == ndim else list(range(arr.ndim - ndim, arr.ndim))
        arr = arr.reshape([arr.shape[i] for i in keep])
        spacing = [spacing[i] for i in keep]
    if arr.ndim != ndim:
        kind = "2D image" if ndim == 2 else f"{ndim}D image"
        raise InputError(path, f"expected a {kind}, found a {arr.ndim}D volume of shape {tuple(arr.shape)}")
    return arr, tuple(spacing)


def _as_image_dtype(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    return arr.astype(np.float32, copy=False)


def read_image(path: str | Path, spacing_range: Sequence[float] = SPACING_RANGE
               ) -> tuple[np.ndarray, tuple[float, float]]:
    """Read one 2D image.

    :param path: any file SimpleITK reads (.nii.gz, .nii, .mhd, .mha, .nrrd, .png, ...).
    :param spacing_range: (lowest, highest) plausible pixel spacing in mm (default
        :data:`~rl_adapt.data.validate.SPACING_RANGE`).
    :returns: ``(image, spacing)``: (H, W) uint8 (kept when stored as uint8) or float32, rows = depth
        (apex up for CAMUS); spacing (row, col) in mm.
    :raises InputError: missing, unreadable, truncated, 3D, NaN/Inf, or spacing outside ``spacing_range``.
    """
    path = Path(path)
    arr, spacing, nonfinite = _read_array(path, spacing_range)
    arr, spacing = _squeeze(arr, spacing, path, 2)
    arr = _as_image_dtype(arr)
    check_image_array(arr, path)
    if nonfinite:
        raise InputError(path, f"image has {nonfinite} NaN/Inf pixel(s)")
    return arr, check_spacing(spacing, path, spacing_range)


def remap_labels(label: np.ndarray, mapping: Mapping[int, int], path: str | Path | None,
                 source: str = "dataset.json") -> np.ndarray:
    """Translate the values of a label map as stored in a file into the project's (see :func:`nnunet_label_map`).

    :param label: (H, W) label map with integral values, any numeric dtype.
    :param mapping: {value in the file: project value in 0..3}; every value present must be declared.
    :param source: what declared the mapping, for the message.
    :returns: (H, W) uint8 label map (0 background, 1 LV, 2 MYO, 3 LA).
    :raises InputError: non-integer values, or values ``mapping`` does not declare.
    """
    check_image_array(label, path)
    if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.round(label)):
        raise InputError(path, "label map has non-integer values")
    values = np.unique(label)
    undeclared = [v.item() for v in values if int(v) not in mapping]
    if undeclared:
        declared = ", ".join(f"{k} {LABELS[v]}" for k, v in sorted(mapping.items()))
        raise InputError(path, f"label value(s) {', '.join(str(v) for v in undeclared[:5])} not declared in "
                               f"{source} labels (declared: {declared})")
    keys = np.array(sorted(mapping), np.int64)
    targets = np.array([mapping[k] for k in sorted(mapping)], np.uint8)
    return targets[np.searchsorted(keys, label.astype(np.int64))]


def read_label(path: str | Path, spacing_range: Sequence[float] = SPACING_RANGE,
               label_map: Mapping[int, int] | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Read one 2D label map: ``(label (H, W) uint8 in 0..3, spacing (row, col) mm)``.

    :param label_map: {value in the file: project value}, e.g. from :func:`nnunet_label_map`; None: the file
        already uses 0 background, 1 LV, 2 MYO, 3 LA.
    """
    path = Path(path)
    arr, spacing, nonfinite = _read_array(path, spacing_range)
    arr, spacing = _squeeze(arr, spacing, path, 2)
    if nonfinite:
        raise InputError(path, f"label map has {nonfinite} NaN/Inf pixel(s)")
    if label_map is not None:
        arr = remap_labels(arr, label_map, path)
    return check_label_array(arr, path), check_spacing(spacing, path, spacing_range)


def read_sequence(path: str | Path, spacing_range: Sequence[float] = SPACING_RANGE
                  ) -> tuple[np.ndarray, tuple[float, float]]:
    """Read a CAMUS half-sequence (``*_half_sequence[_gt].nii.gz``) or any 2D+t file.

    :returns: ``(frames, spacing)``: (T, H, W) uint8/float32 (uint8 kept), spacing (row, col) in mm
        (the frame spacing is dropped). A single 2D image comes back as T = 1.
    """
    path = Path(path)
    arr, spacing, nonfinite = _read_array(path, spacing_range)
    if arr.ndim == 2:
        arr, spacing = arr[None], (1.0,) + tuple(spacing)
    arr, spacing = _squeeze(arr, spacing, path, 3)
    arr = _as_image_dtype(arr)
    if nonfinite or (np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all()):
        raise InputError(path, "sequence has NaN/Inf pixels")
    return arr, check_spacing(spacing[1:], path, spacing_range)


def _load_case(name: str, image_path: Path, label_path: Path | None, meta: dict[str, Any],
               spacing_range: Sequence[float] = SPACING_RANGE, label_map: Mapping[int, int] | None = None) -> Case:
    image, spacing = read_image(image_path, spacing_range)
    label = None
    if label_path is not None:
        label, lspacing = read_label(label_path, spacing_range, label_map)
        check_pair(image.shape, spacing, label.shape, lspacing, label_path, image_path)
    return Case(name=name, image=image, label=label, spacing=spacing, meta=meta, source=str(image_path))


def _load_many(jobs: Sequence[tuple[str, Path, Path | None, dict]], progress: bool = False,
               spacing_range: Sequence[float] = SPACING_RANGE,
               label_map: Mapping[int, int] | None = None) -> list[Case]:
    """Load cases in a small thread pool, keeping order; the first bad file raises."""
    if not jobs:
        return []
    load = partial(_load_case, spacing_range=spacing_range, label_map=label_map)
    workers = max(1, min(N_WORKERS, (os.cpu_count() or 1) * 2, len(jobs)))
    with ThreadPoolExecutor(workers) as pool:
        it: Iterable[Case] = pool.map(lambda j: load(*j), jobs)
        if progress:
            it = tqdm(it, total=len(jobs), desc="reading", unit="case", disable=None)
        cases = list(it)
    return sorted(cases, key=lambda c: c.name)


# ------------------------------------------------------------------------------------------- metadata
def parse_case_name(name: str) -> dict[str, Any]:
    """Metadata from a CAMUS-style case name: ``patient0001_2CH_ED`` -> patient, view, phase; else {}."""
    m = CASE_RE.match(name)
    return dict(m.groupdict()) if m else {}


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def read_info_cfg(path: str | Path) -> dict[str, Any]:
    """Parse a CAMUS ``Info_*.cfg`` ("Key: value" lines) into ``Case.meta`` keys.

    ED/ES/NbFrame/Sex/Age/ImageQuality/EF/FrameRate (2023) and LVedv/LVesv/LVef (2019) map to
    ed_frame/es_frame/nb_frames/sex/age/quality/EF/frame_rate/EDV/ESV; unknown keys are kept as they are.
    """
    path = check_exists(path)
    out: dict[str, Any] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        if key:
            out[_INFO_KEYS.get(key, key)] = _number(value)
    return out


def _split_lists(folder: Path) -> dict[str, str]:
    """CAMUS ``database_split/subgroup_*.txt`` -> {patient: "training"|"validation"|"testing"}."""
    out: dict[str, str] = {}
    for f in sorted(folder.glob("subgroup_*.txt")):
        group = _SPLIT_NAMES.get(f.stem.removeprefix("subgroup_"), f.stem.removeprefix("subgroup_"))
        for line in f.read_text().split():
            out[line.strip()] = group
    return out


# ------------------------------------------------------------------------------------------- formats
def _patient_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name))


def _camus_root_2023(path: Path) -> Path | None:
    if (path / "database_nifti").is_dir():
        return path / "database_nifti"
    if path.is_dir() and any(any(d.glob("*.nii.gz")) for d in _patient_dirs(path)[:3]):
        return path
    return None


def _camus_roots_2019(path: Path) -> list[Path]:
    roots = [path / s for s in ("training", "testing") if (path / s).is_dir()]
    if not roots and path.is_dir() and any(any(d.glob("*.mhd")) for d in _patient_dirs(path)[:3]):
        roots = [path]
    return [r for r in roots if any(any(d.glob("*.mhd")) for d in _patient_dirs(r)[:3])]


def detect_format(path: str | Path) -> str:
    """Which layout ``path`` holds: ``"camus2023"``, ``"camus2019"``, ``"nnunet"`` or ``"folder"``.

    :raises InputError: the path does not exist.
    """
    path = check_exists(path, "dataset folder")
    if path.is_file():
        return "folder"
    if (path / "dataset.json").is_file():
        return "nnunet"
    if _camus_root_2023(path) is not None:
        return "camus2023"
    if _camus_roots_2019(path):
        return "camus2019"
    return "folder"


def _camus_cases(root: Path, suffix: str, with_labels: bool, splits: dict[str, str],
                 default_split: str | None = None) -> list[tuple[str, Path, Path | None, dict]]:
    jobs = []
    for pdir in _patient_dirs(root):
        patient = pdir.name
        infos = {v: read_info_cfg(pdir / f"Info_{v}.cfg") if (pdir / f"Info_{v}.cfg").is_file() else {}
                 for v in ("2CH", "4CH")}
        for view in ("2CH", "4CH"):
            for phase in ("ED", "ES"):
                name = f"{patient}_{view}_{phase}"
                img = pdir / f"{name}{suffix}"
                if not img.is_file():
                    continue
                gt = pdir / f"{name}_gt{suffix}"
                label = gt if with_labels and gt.is_file() else None
                meta: dict[str, Any] = {"patient": patient, "view": view, "phase": phase}
                meta.update(infos[view])
                split = splits.get(patient, default_split)
                if split:
                    meta["split"] = split
                jobs.append((name, img, label, meta))
    return jobs


def read_camus2023(path: str | Path, with_labels: bool = True, progress: bool = False,
                   spacing_range: Sequence[float] = SPACING_RANGE) -> list[Case]:
    """Read the CAMUS 2023 NIfTI release (the folder holding ``database_nifti`` or that folder itself).

    ``meta``: patient, view, phase, split (from ``database_split``), and the Info_<view>.cfg entries.
    """
    path = Path(path)
    root = _camus_root_2023(path)
    if root is None:
        raise InputError(path, "not a CAMUS 2023 folder (no database_nifti/patientXXXX/*.nii.gz)")
    split_dir = root.parent / "database_split"
    splits = _split_lists(split_dir) if split_dir.is_dir() else {}
    jobs = check_not_empty(_camus_cases(root, ".nii.gz", with_labels, splits), root, "CAMUS images")
    return _load_many(jobs, progress, spacing_range)


def read_camus2019(path: str | Path, with_labels: bool = True, progress: bool = False,
                   spacing_range: Sequence[float] = SPACING_RANGE) -> list[Case]:
    """Read the CAMUS 2019 MHD release (the folder holding ``training``/``testing``, or one of them).

    ``meta["split"]`` is the folder name (training/testing); Info cfg LVedv/LVesv/LVef become EDV/ESV/EF.
    """
    path = Path(path)
    roots = _camus_roots_2019(path)
    if not roots:
        raise InputError(path, "not a CAMUS 2019 folder (no training|testing/patientXXXX/*.mhd)")
    jobs = []
    for r in roots:
        jobs += _camus_cases(r, ".mhd", with_labels, {}, r.name if r.name in ("training", "testing") else None)
    return _load_many(check_not_empty(jobs, path, "CAMUS images"), progress, spacing_range)


def read_dataset_json(path: str | Path) -> dict[str, Any]:
    """Load and check an nnU-Net v2 ``dataset.json`` (channel_names, labels, file_ending)."""
    path = check_exists(path)
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise InputError(path, "dataset.json must hold a JSON object")
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in ds]
    if missing:
        raise InputError(path, f"dataset.json lacks {', '.join(missing)}")
    if len(ds["channel_names"]) != 1:
        raise InputError(path, f"expected one input channel (ultrasound), dataset.json has "
                               f"{len(ds['channel_names'])}")
    return ds


def _label_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LABEL_BY_ALIAS = {_label_key(alias): value for value, aliases in LABEL_ALIASES.items() for alias in aliases}
_EXPECTED_LABELS = ('one integer value per class, classes named background, LV (left-ventricle cavity), MYO '
                    '(myocardium) and LA (left atrium), e.g. "labels": {"background": 0, "LV": 1, "MYO": 2, "LA": 3}')


def _label_pairs(labels: Any, path: Path) -> list[tuple[str, int]]:
    """(name, value) pairs of a dataset.json ``labels`` entry, v2 ``{name: value}`` or v1 ``{"value": name}``."""
    shown = json.dumps(labels)
    if not isinstance(labels, Mapping) or not labels:
        raise InputError(path, f"labels {shown} cannot be understood: expected {_EXPECTED_LABELS}")
    if all(isinstance(v, str) for v in labels.values()) and all(str(k).isdigit() for k in labels):
        return [(name, int(value)) for value, name in labels.items()]  # nnU-Net v1: {"0": "background", ...}
    pairs = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InputError(path, f"labels {shown}: region-based labels ({name!r}: {value}) are not supported; "
                                   f"expected {_EXPECTED_LABELS}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(path, f"labels {shown}: value {value!r} of {name!r} is not a non-negative integer; "
                                   f"expected {_EXPECTED_LABELS}")
        pairs.append((str(name), value))
    return pairs


def nnunet_label_map(ds: Mapping[str, Any], path: str | Path) -> dict[int, int] | None:
    """How the label values of an nnU-Net ``dataset.json`` translate into the project's.

    The project's values are :data:`~rl_adapt.data.case.LABELS` (0 background, 1 LV, 2 MYO, 3 LA). Names are
    recognised from :data:`~rl_adapt.data.case.LABEL_ALIASES` (case, spaces, ``_``, ``-`` ignored), in the
    v2 form ``{"LV": 1}`` or the v1 form ``{"1": "LV"}``, with any values: a permuted mapping (``"LA": 1,
    "LV": 3``) is honoured by remapping the label maps. A dataset may declare fewer classes; a label map then
    holding an undeclared value is refused by :func:`remap_labels`.

    :param ds: the loaded dataset.json.
    :param path: the dataset.json file, for messages.
    :returns: {value in the files: project value}, or None when the files use the project's values.
    :raises InputError: naming dataset.json, for labels that are region-based, hold an "ignore" label, use
        unknown names or non-integer/repeated values, name a class twice, or lack background.
    """
    path = Path(path)
    labels = ds.get("labels")
    shown = json.dumps(labels)
    if "regions_class_order" in ds:
        raise InputError(path, f"labels {shown}: region-based labels (regions_class_order) are not supported; "
                               f"expected {_EXPECTED_LABELS}")
    mapping: dict[int, int] = {}
    named: dict[int, str] = {}
    unknown = []
    for name, value in _label_pairs(labels, path):
        if _label_key(name) == "ignore":
            raise InputError(path, f"labels {shown}: an 'ignore' label (partial annotation) is not supported")
        target = _LABEL_BY_ALIAS.get(_label_key(name))
        if target is None:
            unknown.append(name)
        elif target in named:
            raise InputError(path, f"labels {shown}: {named[target]!r} and {name!r} both name {LABELS[target]}")
        elif value in mapping:
            raise InputError(path, f"labels {shown}: value {value} is given to two classes")
        else:
            mapping[value], named[target] = target, name
    if unknown:
        raise InputError(path, f"labels {shown}: class name(s) {', '.join(map(repr, unknown))} not recognised; "
                               f"expected {_EXPECTED_LABELS}")
    if 0 not in named:
        raise InputError(path, f"labels {shown}: no background class; expected {_EXPECTED_LABELS}")
    if mapping == {v: v for v in LABELS}:
        return None
    if any(k != v for k, v in mapping.items()):
        log.info("%s: label values remapped to the project's (%s)", path,
                 ", ".join(f"{named[v]} {k} -> {v}" for k, v in sorted(mapping.items())))
    return mapping


def _nnunet_splits(root: Path) -> dict[str, str]:
    """Case -> group from ``splits*.json`` files shaped ``{"group": [case, ...]}`` (others are ignored)."""
    out: dict[str, str] = {}
    for f in sorted(root.glob("splits*.json")):
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: not valid JSON, ignored", f)
            continue
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            for group, names in data.items():
                for n in names:
                    out.setdefault(str(n), group)
    return out


def read_nnunet(path: str | Path, with_labels: bool = True, progress: bool = False,
                include_test: bool = True, spacing_range: Sequence[float] = SPACING_RANGE) -> list[Case]:
    """Read an nnU-Net v2 raw dataset.

    Training cases (``imagesTr``) carry labels from ``labelsTr`` when ``with_labels``, translated to the
    project's values by the ``labels`` of dataset.json (:func:`nnunet_label_map`); ``imagesTs`` cases
    are unlabelled (``meta["split"] = "test"``). CAMUS-style names fill patient/view/phase; per-case
    metadata from ``rl_adapt_meta.json`` and groups from ``splits*.json`` are merged in when present.
    """
    root = check_exists(path, "dataset folder")
    ds = read_dataset_json(root / "dataset.json")
    label_map = nnunet_label_map(ds, root / "dataset.json") if with_labels else None
    ending = ds["file_ending"]
    extra: dict[str, dict] = {}
    meta_file = root / "rl_adapt_meta.json"
    if meta_file.is_file():
        try:
            extra = json.loads(meta_file.read_text()).get("cases", {})
        except (json.JSONDecodeError, AttributeError):
            raise InputError(meta_file, "not a valid rl_adapt_meta.json ({\"cases\": {name: {...}}})") from None
    splits = _nnunet_splits(root)
    jobs = []
    for sub, labelled in (("imagesTr", True), ("imagesTs", False)):
        if sub == "imagesTs" and not include_test:
            continue
        folder = root / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if not f.name.endswith(ending) or f.name.startswith("."):
                continue
            stem = f.name[: -len(ending)]
            if not stem.endswith("_0000"):
                if re.search(r"_\d{4}$", stem):
                    raise InputError(f, "extra input channel: this reader expects one channel (_0000)")
                continue
            name = stem[:-5]
            label = None
            if labelled and with_labels:
                label = check_exists(root / "labelsTr" / f"{name}{ending}", "label file")
            meta = parse_case_name(name)
            meta.update(extra.get(name, {}))
            if name in splits:
                meta["split"] = splits[name]
            elif not labelled:
                meta.setdefault("split", "test")
            jobs.append((name, f, label, meta))
    return _load_many(check_not_empty(jobs, root, f"images (imagesTr/*_0000{ending})"), progress, spacing_range,
                      label_map)


def read_folder(path: str | Path, with_labels: bool = True, progress: bool = False,
                spacing_range: Sequence[float] = SPACING_RANGE) -> list[Case]:
    """Read a folder of 2D images (any mix of .nii.gz/.nii/.mhd/.mha/.nrrd/.png), one image per file.

    ``X_gt.<ext>`` is the label map of ``X.<ext>`` (used when ``with_labels``); a trailing ``_0000`` is
    dropped from case names; a single file is read as a one-case folder.
    """
    path = check_exists(path, "folder")
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.is_file() and not f.name.startswith(".") and _suffix(f))
    by_name: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for f in files:
        stem = _stem(f)
        if stem.endswith("_gt"):
            labels[stem[:-3]] = f
            continue
        name = stem[:-5] if stem.endswith("_0000") else stem
        if name in by_name:
            raise InputError(f, f"two images for case {name!r} ({by_name[name].name} and {f.name})")
        by_name[name] = f
    check_not_empty(by_name, path, f"images ({', '.join(IMAGE_SUFFIXES)})")
    jobs = [(n, f, labels.get(n) if with_labels else None, parse_case_name(n)) for n, f in by_name.items()]
    return _load_many(jobs, progress, spacing_range)


READERS: dict[str, Callable[..., list[Case]]] = {
    "camus2023": read_camus2023, "camus2019": read_camus2019, "nnunet": read_nnunet, "folder": read_folder,
}


def read_dataset(path: str | Path, with_labels: bool = True, progress: bool = False,
                 fmt: str | None = None, spacing_range: Sequence[float] = SPACING_RANGE) -> list[Case]:
    """Read every 2D case under ``path`` (layout auto-detected unless ``fmt`` is given), sorted by name.

    :param with_labels: read label maps where the layout has them (``False``: images only).
    :param progress: show a tqdm progress bar.
    :param spacing_range: (lowest, highest) plausible pixel spacing in mm, both included; a file whose
        spacing (row or col) is outside, or not finite, is refused. Default
        :data:`~rl_adapt.data.validate.SPACING_RANGE` (0.01 to 10 mm).
    :raises InputError: on the first bad file or an empty folder.
    :raises ValueError: a malformed ``spacing_range``.
    """
    spacing_range = check_spacing_range(spacing_range)
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise InputError(path, f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    cases = READERS[fmt](path, with_labels=with_labels, progress=progress, spacing_range=spacing_range)
    log.info("read %d cases (%s) from %s", len(cases), fmt, path)
    return cases
