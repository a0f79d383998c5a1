"""What an evaluation reads: model folders (``NAME=DIR``), the labelled dataset, the reward network of a run, and
the one postprocessing rule applied to every model. Every problem is one :class:`~rl_adapt.errors.InputError`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from rl_adapt.data.readers import read_dataset
from rl_adapt.errors import InputError, RLAdaptError
from rl_adapt.policies.nnunet import CAMUS_LABELS, load_model_folder
from rl_adapt.postprocessing import load_postprocessing

log = logging.getLogger(__name__)

def parse_model_specs(specs: Sequence[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` (or bare ``DIR``, named after the folder) -> ordered ``{name: Path}``.

    :raises InputError: empty list, empty name, duplicate names.
    """
    out: dict[str, Path] = {}
    if not specs:
        raise InputError(None, "give at least one --model NAME=MODEL_DIR")
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        name = name.strip()
        if not name or not path:
            raise InputError(None, f"--model {spec!r}: expected NAME=MODEL_DIR")
        if name in out:
            raise InputError(Path(path), f"model name {name!r} given twice")
        out[name] = Path(path)
    return out


def parse_comparisons(specs: Sequence[str], names: Sequence[str]) -> list[tuple[str, str]]:
    """``["NAME:REFERENCE", ...]`` -> ``[(name, reference), ...]``, both among ``names`` (the evaluated models).

    :raises InputError: a spec without ``:``, a name that is not one of the models, a model compared with itself.
    """
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, ref = str(spec).partition(":")
        name, ref = name.strip(), ref.strip()
        if not sep or not name or not ref:
            raise InputError(None, f"--compare {spec!r}: expected NAME:REFERENCE, two of the --model names")
        for n in (name, ref):
            if n not in names:
                raise InputError(None, f"--compare {spec!r}: {n!r} is not one of the models given: {list(names)}")
        if name == ref:
            raise InputError(None, f"--compare {spec!r}: a model compared with itself")
        pairs.append((name, ref))
    return pairs


def load_model(model_dir: str | Path, device: str = "cpu"):
    """Load an nnU-Net v2 results folder; any failure becomes one :class:`InputError` naming the folder.

    The label set must be CAMUS's (background, LV, MYO, LA) so that metrics compare like with like.
    """

    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(path, "model folder not found")
    try:
        return load_model_folder(path, device=device, expected_labels=CAMUS_LABELS)
    except RLAdaptError:
        raise
    except Exception as exc:  # nnunetv2/torch raise many types on a broken folder
        raise InputError(path, f"not a loadable nnU-Net v2 results folder ({type(exc).__name__}: {exc})") from exc


def load_labelled(data: str | Path, progress: bool = False) -> list:
    """Read a labelled dataset (any reader format) and keep its labelled cases.

    :raises InputError: missing/empty folder, no labelled case, a label map whose shape differs from its
        image, labels outside 0..3, duplicate case names.
    """

    path = Path(data)
    if not path.exists():
        raise InputError(path, "labelled dataset not found")
    if path.is_dir() and not any(path.iterdir()):
        raise InputError(path, "folder is empty")
    cases = read_dataset(path, with_labels=True, progress=progress)
    if not cases:
        raise InputError(path, "no cases found")
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise InputError(path, f"none of the {len(cases)} cases has a label map; evaluate needs a labelled set")
    if len(labelled) < len(cases):
        log.warning("%s: %d of %d cases have no label map and are skipped", path, len(cases) - len(labelled), len(cases))
    names = [c.name for c in labelled]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(path, f"duplicate case names: {', '.join(dup[:5])}")
    for c in labelled:
        if tuple(c.label.shape) != tuple(c.image.shape[:2]):
            raise InputError(c.source or path, f"{c.name}: label shape {c.label.shape} differs from image {c.image.shape}")
        if c.label.size and int(c.label.max()) > 3:
            raise InputError(c.source or path, f"{c.name}: labels outside 0..3 (bg, LV, MYO, LA)")
    return labelled


def find_reward_net(run: str | Path) -> Path:
    """The reward-network file of an adaptation run folder (``RUN/reward_net.pt``, else the last
    ``RUN/iter*/reward_net.pt``), or ``run`` itself when it is a file."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise InputError(run, "reward run folder not found")
    if (run / "reward_net.pt").is_file():
        return run / "reward_net.pt"
    iters = sorted(run.glob("iter*/reward_net.pt"), key=lambda p: int("".join(ch for ch in p.parent.name if ch.isdigit()) or 0))
    if iters:
        return iters[-1]
    raise InputError(run, "no reward_net.pt in this run folder (expected RUN/reward_net.pt or RUN/iter*/reward_net.pt)")


def resolve_postprocessing(specs: Mapping[str, Path], choice: str):
    """The one postprocessing rule to apply to every model (None: raw only) and where it came from.

    :param choice: "none", "auto" (the models' own ``postprocessing.json``) or a path (see
        :attr:`EvaluateConfig.postprocessing`).
    :raises InputError: an unreadable rule, or models carrying different rules under "auto".
    """

    if choice == "none":
        return None
    if choice != "auto":
        rule = load_postprocessing(Path(choice))
        if rule is None:
            raise InputError(Path(choice), "no postprocessing.json there")
        return rule
    found = {name: load_postprocessing(path) for name, path in specs.items() if Path(path).is_dir()}
    found = {name: r for name, r in found.items() if r is not None and r.steps}  # an empty rule changes nothing
    if not found:
        return None
    keys = {r.key() for r in found.values()}
    if len(keys) > 1:
        raise InputError(None, "the models carry different postprocessing rules ("
                         + "; ".join(f"{n}: {r.describe()}" for n, r in found.items())
                         + "): pass --postprocessing FILE to apply one of them to all models, or none")
    name, rule = next(iter(found.items()))
    rule.source = f"{rule.source} (model {name!r}; applied to every model)"
    return rule
