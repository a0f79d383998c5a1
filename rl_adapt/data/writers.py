"""Writers: single images and masks, nnU-Net v2 raw datasets and the CAMUS 2023 layout.

Everything is written atomically (:mod:`rl_adapt.io_utils`): a file appears complete or not at all and
a dataset folder appears only once every file in it is written. Arrays are (rows, cols) = apex up;
SimpleITK takes spacing as (x, y) = (col, row), so spacing is reversed on the way out.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from rl_adapt.data.case import LABELS, Case
from rl_adapt.data.validate import check_case, check_image_array, check_label_array, check_spacing
from rl_adapt.errors import InputError
from rl_adapt.io_utils import atomic_dir, atomic_path, write_json_atomic, write_text_atomic
from tqdm import tqdm

log = logging.getLogger(__name__)

NNUNET_LABELS = {name: value for value, name in LABELS.items()}
"""nnU-Net ``labels`` entry: {"background": 0, "LV": 1, "MYO": 2, "LA": 3}."""

META_FILE = "rl_adapt_meta.json"
"""Per-case metadata written next to ``dataset.json`` (nnU-Net ignores it; the reader merges it)."""

_INFO_ORDER = [("ED", "ed_frame"), ("ES", "es_frame"), ("NbFrame", "nb_frames"), ("Sex", "sex"),
               ("Age", "age"), ("ImageQuality", "quality"), ("EF", "EF"), ("EDV", "EDV"), ("ESV", "ESV"),
               ("FrameRate", "frame_rate")]
_SPLIT_FILE = {"training": "training", "train": "training", "validation": "validation", "val": "validation",
               "testing": "testing", "test": "testing"}


def _sitk_image(array: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing([float(s) for s in spacing[::-1]])
    return img


def _write_sitk(img: sitk.Image, path: Path) -> None:
    """Write atomically; ``.mhd`` gets its ``.raw`` written in a temporary folder and moved first."""
    path = Path(path)
    if path.name.lower().endswith(".mhd"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            sitk.WriteImage(img, str(tmp / path.name))
            for f in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".mhd"):  # data file before header
                os.replace(f, path.parent / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def write_image(path: str | Path, array2d: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> Path:
    """Write one 2D image.

    :param path: output file; the ending picks the format (.nii.gz, .nii, .mhd, .mha, .nrrd, .png).
    :param array2d: (H, W) uint8/float32 image, rows = depth (apex up). PNG needs uint8/uint16.
    :param spacing: (row, col) pixel size in mm (PNG cannot store it).
    """
    path = Path(path)
    check_image_array(np.asarray(array2d), path)
    _write_sitk(_sitk_image(np.asarray(array2d), check_spacing(spacing, path)), path)
    return path


def _geometry_of(source: str | None) -> tuple[tuple[int, ...], tuple, tuple, tuple] | None:
    """(size, spacing, origin, direction) of an existing image file's header, or None."""
    if not source or not Path(source).is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def write_mask(path: str | Path, mask: np.ndarray, like: Case | None = None,
               spacing: Sequence[float] = (1.0, 1.0)) -> Path:
    """Write a label map with the geometry of its input image.

    :param mask: (H, W) integer label map with values 0..3 (stored as uint8).
    :param like: the case the mask belongs to: its spacing is used and, when ``like.source`` is an image
        file, its origin, direction and dimensionality (a 2D image stored as 3D gives a 3D mask of the
        same size), so viewers overlay mask and image exactly.
    :param spacing: (row, col) mm, used when ``like`` is None.
    """
    path = Path(path)
    mask = check_label_array(np.asarray(mask), path)
    if like is not None:
        if mask.shape != like.image.shape:
            raise InputError(path, f"mask size {mask.shape} does not match image size {like.image.shape} "
                                   f"of case {like.name}")
        spacing = like.spacing
    img = _sitk_image(mask, check_spacing(spacing, path))
    geo = _geometry_of(like.source) if like is not None else None
    if geo is not None and int(np.prod(geo[0])) == mask.size:
        size, sp, origin, direction = geo
        if len(size) == 2:
            img.SetOrigin(origin)
            img.SetDirection(direction)
        elif len(size) == 3 and not path.name.lower().endswith(".png"):
            img = sitk.GetImageFromArray(mask.reshape(size[::-1]))
            img.SetSpacing(sp)
            img.SetOrigin(origin)
            img.SetDirection(direction)
    _write_sitk(img, path)
    return path


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in meta.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x.item() if isinstance(x, np.generic) else x for x in v]
    return out


def _check_cases(cases: Sequence[Case], need_labels: bool) -> list[Case]:
    cases = list(cases)
    if not cases:
        raise InputError(None, "no cases to write")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise InputError(None, f"duplicate case names: {', '.join(dup)}")
    for c in cases:
        check_case(c)
        if need_labels and c.label is None:
            raise InputError(c.source or c.name, "labelled dataset requested but this case has no label map")
    return cases


def write_nnunet_raw(cases: Iterable[Case], out_dir: str | Path, dataset_name: str = "Dataset900_Synth",
                     labelled: bool = True, overwrite: bool = False, progress: bool = False) -> Path:
    """Write an nnU-Net v2 raw dataset folder.

    ``labelled``: images to ``imagesTr/<case>_0000.nii.gz``, labels to ``labelsTr/<case>.nii.gz``; else
    images to ``imagesTs/``. ``dataset.json`` has channel_names {"0": "US"}, labels
    :data:`NNUNET_LABELS`, numTraining and file_ending ".nii.gz"; per-case ``meta`` (EF, EDV, view, ...)
    goes to :data:`META_FILE`, which nnU-Net ignores and :func:`~rl_adapt.data.readers.read_nnunet` reads.

    :param out_dir: the dataset folder (created atomically; must not exist unless ``overwrite``).
    """
    cases = _check_cases(cases, labelled)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        images = tmp / ("imagesTr" if labelled else "imagesTs")
        images.mkdir()
        if labelled:
            (tmp / "labelsTr").mkdir()
        it: Iterable[Case] = cases
        if progress:
            it = tqdm(cases, desc="writing", unit="case", disable=None)
        for c in it:
            write_image(images / f"{c.name}_0000.nii.gz", c.image, c.spacing)
            if labelled:
                write_mask(tmp / "labelsTr" / f"{c.name}.nii.gz", c.label, spacing=c.spacing)
        write_json_atomic(tmp / "dataset.json", {
            "name": dataset_name.split("_", 1)[-1] if dataset_name.startswith("Dataset") else dataset_name,
            "channel_names": {"0": "US"},
            "labels": dict(NNUNET_LABELS),
            "numTraining": len(cases) if labelled else 0,
            "file_ending": ".nii.gz",
        })
        write_json_atomic(tmp / META_FILE, {"dataset_name": dataset_name,
                                            "cases": {c.name: _jsonable(c.meta) for c in cases}})
    log.info("wrote %d cases to %s", len(cases), out_dir)
    return Path(out_dir)


def _info_cfg(meta: dict[str, Any]) -> str:
    lines = []
    for key, mkey in _INFO_ORDER:
        v = meta.get(mkey)
        if v is None:
            continue
        if isinstance(v, float):
            v = f"{v:.2f}".rstrip("0").rstrip(".")
        lines.append(f"{key}: {v}")
    return "\n".join(lines) + "\n"


def write_camus(cases: Iterable[Case], out_dir: str | Path, overwrite: bool = False,
                progress: bool = False) -> Path:
    """Write the CAMUS 2023 NIfTI layout.

    ``database_nifti/patientXXXX/patientXXXX_{view}_{phase}.nii.gz`` (+ ``_gt.nii.gz`` when labelled),
    ``Info_{2CH,4CH}.cfg`` (ED, ES, NbFrame, Sex, Age, ImageQuality, EF, EDV, ESV, FrameRate from
    ``meta``) and ``database_split/subgroup_{training,validation,testing}.txt`` from ``meta["split"]``
    (cases without a split go to training). Every case needs meta patient, view, phase.
    """
    cases = _check_cases(cases, False)
    for c in cases:
        if not all(c.meta.get(k) for k in ("patient", "view", "phase")):
            raise InputError(c.source or c.name, "CAMUS layout needs meta patient, view and phase")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        root = tmp / "database_nifti"
        splits: dict[str, set[str]] = {"training": set(), "validation": set(), "testing": set()}
        infos: dict[tuple[str, str], dict[str, Any]] = {}
        it: Iterable[Case] = cases
        if progress:
            it = tqdm(cases, desc="writing", unit="case", disable=None)
        for c in it:
            p, v, ph = c.meta["patient"], c.meta["view"], c.meta["phase"]
            pdir = root / p
            pdir.mkdir(parents=True, exist_ok=True)
            write_image(pdir / f"{p}_{v}_{ph}.nii.gz", c.image, c.spacing)
            if c.label is not None:
                write_mask(pdir / f"{p}_{v}_{ph}_gt.nii.gz", c.label, spacing=c.spacing)
            infos.setdefault((p, v), {}).update({k: x for k, x in c.meta.items() if x is not None})
            splits[_SPLIT_FILE.get(str(c.meta.get("split", "training")), "training")].add(p)
        for (p, v), meta in infos.items():
            write_text_atomic(root / p / f"Info_{v}.cfg", _info_cfg(meta))
        (tmp / "database_split").mkdir()
        for group, patients in splits.items():
            write_text_atomic(tmp / "database_split" / f"subgroup_{group}.txt",
                              "".join(f"{p}\n" for p in sorted(patients)))
    log.info("wrote %d cases (CAMUS 2023 layout) to %s", len(cases), out_dir)
    return Path(out_dir)
