"""Atomic file and folder writes: a run killed at any moment leaves either the old or the new file.

Everything the project writes goes through these helpers: write to a temporary sibling, flush,
then ``os.replace`` (atomic on POSIX within one file system).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from rl_adapt.errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. Suffixes are kept
    (``x.nii.gz`` -> ``.x.nii.gz.tmp-XXXX.nii.gz``) so writers that dispatch on the extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs are meant to be shared
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success rename it to ``path``.

    :param overwrite: replace an existing ``path``; otherwise an existing ``path`` is an error
        raised before anything is written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (choose another output folder)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """The JSON document at ``path``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (NaN is written as ``NaN``, as Python's json does)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to one compressed ``.npz`` at ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def read_npz(path: str | Path, what: str, required: Sequence[str]) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` (no pickles), checked to hold ``required``.

    :param what: the kind of file, for the errors (e.g. ``"target style"``).
    :raises InputError: naming the file: missing, unreadable, or without one of ``required``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any read failure is the file's fault
        raise InputError(path, f"cannot read {what} ({exc})") from exc
    missing = set(required) - set(data)
    if missing:
        raise InputError(path, f"not a {what} file: missing {sorted(missing)}")
    return data


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (torch is imported only here, when called)."""
    import torch  # io_utils stays importable without torch (``rl-adapt info`` does not pay for it)

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line to ``path`` and fsync, so a completed record survives a kill (a line a kill tore off
    mid-write is ended first, so the new record stays a line of its own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(("\n" if torn else "") + json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _csv_cell(v: Any) -> Any:
    """None and non-finite floats -> "", booleans -> 0/1, floats -> 8 significant digits."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.8g}"
    return v


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Write dict ``rows`` as CSV atomically; NaN/None become empty cells, booleans 0/1.

    :param columns: column order; default: keys in order of first appearance over the rows.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            for k in r:
                seen.setdefault(k)
        columns = list(seen)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: _csv_cell(r.get(k)) for k in columns})


def json_clean(obj: Any) -> Any:
    """Replace NaN/Inf floats by None (recursively) and numpy scalars by Python ones, for strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def read_csv(path: str | Path, text_columns: Sequence[str] = ()) -> list[dict]:
    """Read a CSV written by :func:`write_csv`; numeric cells become floats, empty cells NaN.

    :param text_columns: columns kept as strings ("" stays "").
    """
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            row = {}
            for k, v in r.items():
                if k in text_columns:
                    row[k] = v
                    continue
                if v == "":
                    row[k] = float("nan")
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    row[k] = v
            out.append(row)
    return out
