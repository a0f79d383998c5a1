"""Checks every writing command runs before any work: where it writes, on which device, with which names.

A command that fails should fail in its first second, not after training, and never at the cost of an input.
Each check raises one :class:`~rl_adapt.errors.InputError` (or :class:`~rl_adapt.errors.ConfigError`) whose
message names the offending path or value and what is wrong, which the command line prints as one line:

* :func:`check_output` -- the output folder can be created and written, does not exist (unless the command
  resumes or overwrites by design, and then only an earlier output of the same command), and is neither an
  input, nor inside one, nor above one (replacing it would delete the input);
* :func:`check_device` -- the torch device exists on this machine;
* :func:`match_expert_names` -- which expert masks have a target image of the same name;
* :func:`blank_images` / :func:`warn_blank_images` -- images whose pixels are all the same value (nothing to
  segment; a model segments them anyway).

Only the standard library and numpy are imported at module level, so that the checks run before the heavy
imports (torch, nnU-Net) of a command.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from rl_adapt.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mhd", ".mha", ".png", ".npy", ".npz")
"""File endings stripped from a file name to get its case name (:func:`case_name`)."""

_PROBE_PREFIX = ".rl-adapt-write-check-"


def _real(path: str | Path) -> Path:
    """``path`` made absolute with every symbolic link of its existing part resolved (the path may not exist)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _nearest_existing(path: Path) -> Path:
    """``path`` itself when it exists, else its closest existing ancestor (``/`` at worst)."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(path.anchor or "/")


def _probe_writable(folder: Path, out: Path) -> None:
    """Create and remove an empty folder in ``folder``: the one test of writability that also holds for root
    (who passes every permission bit) and for read-only file systems.

    :raises InputError: naming ``out`` and the folder that cannot be written.
    """
    try:
        probe = tempfile.mkdtemp(prefix=_PROBE_PREFIX, dir=folder)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise InputError(out, f"cannot be written: creating a folder in {folder} failed ({why})") from None
    try:
        os.rmdir(probe)
    except OSError:  # pragma: no cover - we just made it, empty
        log.debug("could not remove the write probe %s", probe)


def _relation(out: Path, inp: Path) -> str | None:
    """How the (resolved) output path ``out`` sits against the (resolved) input ``inp``: "is", "inside",
    "holds" or None (unrelated)."""
    if out == inp:
        return "is"
    if inp in out.parents:
        return "inside"
    if out in inp.parents:
        return "holds"
    return None


def check_output(out: str | Path, inputs: Mapping[str, str | Path | None] | None = None, may_exist: bool = False,
                 earlier_output: Sequence[str] = (), command: str = "this command",
                 exists_hint: str = "choose a new output folder") -> Path:
    """Check, before any work, that a command may write its output folder ``out``.

    The rules, in this order:

    1. ``out`` is not one of the ``inputs``, not inside one and does not hold one (symbolic links resolved);
       a file input protects the file itself (an output may sit beside it, not replace it);
    2. an existing ``out`` is refused unless ``may_exist`` (a command that resumes or overwrites by design);
       then it must be a folder and either empty or an earlier output of the same command: it holds every
       name of ``earlier_output`` (e.g. ``summary.json`` and ``inputs.json`` for ``rl-adapt evaluate``);
    3. ``out`` can be created: its closest existing ancestor is a folder in which a new entry can be made (and
       an existing ``out`` can be written, as can its parent, where atomic writers build their temporary twin).
       The test creates and removes a hidden empty folder; nothing else is written.

    ``Adapter`` (``rl_adapt/engine/loop.py``) calls it as
    ``check_output(run_dir, {"--model": model_dir, "--target": target_dir, ...}, may_exist=resume,
    earlier_output=("config.yaml",), command="rl-adapt adapt")``.

    :param out: the output folder a command is about to write.
    :param inputs: ``{name shown in messages (e.g. "--data"): path}``; None values are skipped.
    :param may_exist: the command resumes or overwrites an existing ``out`` by design.
    :param earlier_output: names (files or folders) that make an existing, non-empty ``out`` an earlier output of
        the same command; empty: any existing folder is accepted when ``may_exist``.
    :param command: the command named in messages (``"rl-adapt evaluate"``).
    :param exists_hint: what to do about an existing ``out`` when it may not exist.
    :returns: ``out`` as a :class:`~pathlib.Path` (as given, not resolved).
    :raises InputError: the first rule broken, naming ``out`` and, where one is involved, the input.
    """
    out = Path(out)
    if not os.fspath(out).strip():
        raise InputError(None, "the output folder is an empty path")
    real_out = _real(out)
    for name, path in (inputs or {}).items():
        if path is None:
            continue
        real_in = _real(path)
        relation = _relation(real_out, real_in)
        if relation is None:
            continue
        if relation == "is":
            raise InputError(out, f"is the {name} input; write the output to a new folder outside every input")
        if relation == "inside":
            if not real_in.is_dir():
                continue  # under a file: creation fails below with a clearer message
            raise InputError(out, f"is inside the {name} input {path}; write the output to a new folder outside "
                                  "every input")
        raise InputError(out, f"holds the {name} input {path}; writing here could destroy it: choose a new "
                              "output folder outside every input")
    if os.path.lexists(out):
        if not may_exist:
            raise InputError(out, f"already exists; {exists_hint}")
        if not out.is_dir():
            raise InputError(out, "exists and is not a folder; choose a new output folder")
        missing = [n for n in earlier_output if not os.path.lexists(out / n)]
        if missing and any(out.iterdir()):
            raise InputError(out, f"exists and is not an earlier output of {command} (no {', '.join(missing)}); "
                                  "refusing to write into it: choose a new output folder")
        _probe_writable(out, out)
        _probe_writable(real_out.parent, out)
        return out
    anchor = _nearest_existing(out.parent if out.parent != out else out)
    if not anchor.is_dir():
        raise InputError(out, f"cannot be created: {anchor} is a file, not a folder")
    _probe_writable(anchor, out)
    return out


def check_device(name: str):
    """The torch device called ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``), checked to exist here.

    :raises ConfigError: a name torch does not know or that is not CPU/CUDA (e.g. ``tpu``).
    :raises InputError: CUDA asked for on a machine without CUDA (or with fewer devices).
    """
    from rl_adapt.devices import pick_device  # imports torch: only when a command gets this far

    return pick_device(str(name))


def check_option(flag: str, value, ge: float | None = None, gt: float | None = None, le: float | None = None,
                 lt: float | None = None) -> None:
    """A command-line option's value inside its range (``ge``/``gt`` below, ``le``/``lt`` above; NaN never is).

    :raises ConfigError: ``"--size: 8 is out of range (must be >= 32 and <= 4096)"``.
    """
    from rl_adapt.config import Bounds
    from rl_adapt.errors import ConfigError

    problem = Bounds(ge=ge, gt=gt, le=le, lt=lt).problem(value)
    if problem:
        raise ConfigError(f"{flag}: {value!r} {problem}")


def check_existing(inputs: Mapping[str, str | Path | None]) -> None:
    """Every given input path exists.

    :param inputs: ``{name shown in messages: path}``; None values are skipped.
    :raises InputError: ``"<path>: does not exist (given as <name>)"`` for the first missing one.
    """
    for name, path in inputs.items():
        if path is not None and not os.path.lexists(path):
            raise InputError(path, f"does not exist (given as {name})")


def case_name(file_name: str) -> str:
    """The case name of an image or mask file name: the name without its image ending (:data:`IMAGE_SUFFIXES`)
    and without nnU-Net's channel suffix ``_0000``."""
    name = Path(file_name).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if name.endswith("_0000") else name


def match_expert_names(expert_names: Iterable[str], target_names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split expert masks into those named like a target image and those that match none.

    Names may be case names or file names (endings and nnU-Net's ``_0000`` are ignored, :func:`case_name`).
    The caller decides what an unmatched mask means; ``rl-adapt adapt`` should refuse a folder in which no mask
    matches and warn (with the count) when some do not.

    :returns: ``(matched, unmatched)``, each the expert names as given, in their order.
    """
    targets = {case_name(n) for n in target_names}
    matched, unmatched = [], []
    for n in expert_names:
        (matched if case_name(n) in targets else unmatched).append(n)
    return matched, unmatched


def blank_images(cases: Sequence) -> list[str]:
    """Names of the cases whose image has a single value (all zero, or all one grey): nothing to segment."""
    import numpy as np

    out = []
    for c in cases:
        img = np.asarray(c.image)
        if img.size == 0 or float(np.nanmax(img)) == float(np.nanmin(img)):
            out.append(c.name)
    return out


def warn_blank_images(cases: Sequence, what: str = "segmented anyway") -> list[str]:
    """Log one WARNING when some images are blank (:func:`blank_images`); return their names.

    :param what: what the command does with them, finishing the sentence "they are ...".
    """
    blank = blank_images(cases)
    if blank:
        shown = ", ".join(blank[:5]) + (", ..." if len(blank) > 5 else "")
        log.warning("%d of %d images are blank (every pixel the same value: %s); they are %s and their masks "
                    "mean nothing", len(blank), len(cases), shown, what)
    return blank
