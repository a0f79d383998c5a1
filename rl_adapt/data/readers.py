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
"""
from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from rl_adapt.data.case import Case
from rl_adapt.data.validate import (check_exists, check_image_array, check_label_array, check_not_empty,
                                    check_pair, check_spacing)
from rl_adapt.errors import InputError

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
"""Threads used to read many files (SimpleITK releases the GIL while decoding)."""


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


def _read_sitk(path: str | Path) -> sitk.Image:
    path = check_exists(path)
    if path.is_dir():
        raise InputError(path, "expected an image file, found a folder")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "rror" in ln or "annot" in ln), first[-1] if first else "")
        raise InputError(path, f"unreadable or corrupt image ({detail[:160]})") from None


def _nifti_nonfinite(path: Path) -> int:
    """Count NaN/Inf voxels in a float NIfTI file by reading its raw data.

    ITK's NIfTI reader silently turns NaN/Inf into 0, so the check has to look at the file itself.
    Returns 0 for files that are not float NIfTI-1/2 or that cannot be parsed.
    """
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError):
        return 0
    for endian in ("<", ">"):
        size = int(np.frombuffer(raw[:4], endian + "i4")[0]) if len(raw) >= 4 else 0
        if size == 348 and len(raw) >= 348:
            dtype_code = int(np.frombuffer(raw[70:72], endian + "i2")[0])
            offset = int(np.frombuffer(raw[108:112], endian + "f4")[0])
            break
        if size == 540 and len(raw) >= 540:
            dtype_code = int(np.frombuffer(raw[12:14], endian + "i2")[0])
            offset = int(np.frombuffer(raw[168:176], endian + "i8")[0])
            break
    else:
        return 0
    dtype = {16: "f4", 64: "f8"}.get(dtype_code)
    if dtype is None:
        return 0
    data = np.frombuffer(raw, endian + dtype, offset=offset, count=(len(raw) - offset) // np.dtype(dtype).itemsize)
    return int((~np.isfinite(data)).sum())


def _to_array(img: sitk.Image, path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Array in numpy (z, y, x) order and spacing in the same order; colour images become grey."""
    arr = sitk.GetArrayFromImage(img)
    spacing = tuple(float(s) for s in img.GetSpacing()[::-1])
    if img.GetNumberOfComponentsPerPixel() > 1:
        chans = arr[..., :3].astype(np.float32)
        if chans.shape[-1] >= 3 and not (np.array_equal(arr[..., 0], arr[..., 1])
                                         and np.array_equal(arr[..., 0], arr[..., 2])):
            grey = chans @ np.array([0.299, 0.587, 0.114], np.float32)
        else:
            grey = chans[..., 0]
        arr = np.clip(np.round(grey), 0, 255).astype(np.uint8) if arr.dtype == np.uint8 else grey
    return arr, spacing


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


def read_image(path: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Read one 2D image.

    :param path: any file SimpleITK reads (.nii.gz, .nii, .mhd, .mha, .nrrd, .png, ...).
    :returns: ``(image, spacing)``: (H, W) uint8 (kept when stored as uint8) or float32, rows = depth
        (apex up for CAMUS); spacing (row, col) in mm.
    :raises InputError: missing, unreadable, 3D, NaN/Inf or non-positive spacing.
    """
    path = Path(path)
    img = _read_sitk(path)
    arr, spacing = _to_array(img, path)
    arr, spacing = _squeeze(arr, spacing, path, 2)
    arr = _as_image_dtype(arr)
    check_image_array(arr, path)
    if arr.dtype != np.uint8 and ".nii" in path.name.lower() and _nifti_nonfinite(path):
        raise InputError(path, f"image has {_nifti_nonfinite(path)} NaN/Inf pixel(s)")
    return arr, check_spacing(spacing, path)


def read_label(path: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Read one 2D label map: ``(label (H, W) uint8 in 0..3, spacing (row, col) mm)``."""
    path = Path(path)
    img = _read_sitk(path)
    arr, spacing = _to_array(img, path)
    arr, spacing = _squeeze(arr, spacing, path, 2)
    return check_label_array(arr, path), check_spacing(spacing, path)


def read_sequence(path: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Read a CAMUS half-sequence (``*_half_sequence[_gt].nii.gz``) or any 2D+t file.

    :returns: ``(frames, spacing)``: (T, H, W) uint8/float32 (uint8 kept), spacing (row, col) in mm
        (the frame spacing is dropped). A single 2D image comes back as T = 1.
    """
    path = Path(path)
    img = _read_sitk(path)
    arr, spacing = _to_array(img, path)
    if arr.ndim == 2:
        arr, spacing = arr[None], (1.0,) + tuple(spacing)
    arr, spacing = _squeeze(arr, spacing, path, 3)
    arr = _as_image_dtype(arr)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError(path, "sequence has NaN/Inf pixels")
    return arr, check_spacing(spacing[1:], path)


def _load_case(name: str, image_path: Path, label_path: Path | None, meta: dict[str, Any]) -> Case:
    image, spacing = read_image(image_path)
    label = None
    if label_path is not None:
        label, lspacing = read_label(label_path)
        check_pair(image.shape, spacing, label.shape, lspacing, label_path, image_path)
    return Case(name=name, image=image, label=label, spacing=spacing, meta=meta, source=str(image_path))


def _load_many(jobs: Sequence[tuple[str, Path, Path | None, dict]], progress: bool = False) -> list[Case]:
    """Load cases in a small thread pool, keeping order; the first bad file raises."""
    if not jobs:
        return []
    workers = max(1, min(N_WORKERS, (os.cpu_count() or 1) * 2, len(jobs)))
    with ThreadPoolExecutor(workers) as pool:
        it: Iterable[Case] = pool.map(lambda j: _load_case(*j), jobs)
        if progress:
            from tqdm import tqdm
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


def read_camus2023(path: str | Path, with_labels: bool = True, progress: bool = False) -> list[Case]:
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
    return _load_many(jobs, progress)


def read_camus2019(path: str | Path, with_labels: bool = True, progress: bool = False) -> list[Case]:
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
    return _load_many(check_not_empty(jobs, path, "CAMUS images"), progress)


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
                include_test: bool = True) -> list[Case]:
    """Read an nnU-Net v2 raw dataset.

    Training cases (``imagesTr``) carry labels from ``labelsTr`` when ``with_labels``; ``imagesTs`` cases
    are unlabelled (``meta["split"] = "test"``). CAMUS-style names fill patient/view/phase; per-case
    metadata from ``rl_adapt_meta.json`` and groups from ``splits*.json`` are merged in when present.
    """
    root = check_exists(path, "dataset folder")
    ds = read_dataset_json(root / "dataset.json")
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
    return _load_many(check_not_empty(jobs, root, f"images (imagesTr/*_0000{ending})"), progress)


def read_folder(path: str | Path, with_labels: bool = True, progress: bool = False) -> list[Case]:
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
    return _load_many(jobs, progress)


READERS: dict[str, Callable[..., list[Case]]] = {
    "camus2023": read_camus2023, "camus2019": read_camus2019, "nnunet": read_nnunet, "folder": read_folder,
}


def read_dataset(path: str | Path, with_labels: bool = True, progress: bool = False,
                 fmt: str | None = None) -> list[Case]:
    """Read every 2D case under ``path`` (layout auto-detected unless ``fmt`` is given), sorted by name.

    :param with_labels: read label maps where the layout has them (``False``: images only).
    :param progress: show a tqdm progress bar.
    :raises InputError: on the first bad file or an empty folder.
    """
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise InputError(path, f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    cases = READERS[fmt](path, with_labels=with_labels, progress=progress)
    log.info("read %d cases (%s) from %s", len(cases), fmt, path)
    return cases
