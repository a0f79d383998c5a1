"""Resumable run state: which stages of a run are finished, recorded atomically.

A run folder holds ``state.json``: ``{"version": 1, "completed": {stage: {...info}}, "config_sha": str}``.
A stage writes all of its outputs (atomically, each) *before* it is marked complete, so a run killed at
any moment either has a stage's outputs and its mark, or redoes that stage from scratch on resume.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from rl_adapt.config import differences
from rl_adapt.errors import RLAdaptError
from rl_adapt.io_utils import write_json_atomic

log = logging.getLogger(__name__)


class RunState:
    """Completed-stage bookkeeping of one run folder.

    :param run_dir: the run folder (created if needed).
    :param sha: the config hash of this run; resuming with another hash raises :class:`RLAdaptError`.
    :param settings: what the hash was computed from (saved with the state), so that a mismatch can name the keys
        that differ.
    """

    def __init__(self, run_dir: str | Path, sha: str, settings: dict | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "state.json"
        self.sha = sha
        self.settings = settings
        self.completed: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise RLAdaptError(f"{self.path}: unreadable run state ({exc})") from exc
            if data.get("config_sha") != sha:
                diff = differences(data.get("settings"), settings) if data.get("settings") and settings else []
                what = ("; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")) if diff else \
                    f"configuration {data.get('config_sha')} then, {sha} now"
                raise RLAdaptError(f"{self.run_dir}: this run was started with other settings ({what}); resume it "
                                   "with the same inputs, --config and --set, or start a new run folder")
            self.completed = dict(data.get("completed", {}))

    def reload(self) -> None:
        """Read the finished stages again from ``state.json`` (another process of the job wrote it)."""
        if self.path.exists():
            self.completed = dict(json.loads(self.path.read_text()).get("completed", {}))

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in this or an earlier process."""
        return stage in self.completed

    def info(self, stage: str) -> dict[str, Any]:
        """What ``stage`` recorded when it finished (empty dict if nothing)."""
        return self.completed.get(stage, {})

    def mark(self, stage: str, info: dict[str, Any] | None = None) -> None:
        """Record ``stage`` as finished (atomic rewrite of ``state.json``)."""
        self.completed[stage] = dict(info or {})
        write_json_atomic(self.path, {"version": 1, "config_sha": self.sha, "settings": self.settings,
                                      "completed": self.completed})
        log.debug("stage %s complete", stage)


def without_keys(settings: dict, keys: tuple[str, ...]) -> dict:
    """A copy of the nested ``settings`` without ``keys`` (dotted paths from the top, e.g. ``"cfg.device"``): what a
    resume must match once where and how fast a run ran is left out."""
    out = copy.deepcopy(settings)
    for key in keys:
        node: Any = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return out

def finished_record(path: str | Path, settings: dict, what: str) -> dict[str, Any]:
    """The record a finished run wrote (``path``: JSON holding the ``"settings"`` it ran with), when those are
    ``settings``: ``--resume`` of a finished run then hands back its result without redoing anything (a batch job
    requeued after it finished succeeds, as ``rl-adapt adapt --resume`` does).

    :param settings: the inputs and config of this call (JSON-ready), as the run records them.
    :param what: the command's work, for the messages (``"baseline"``, ``"evaluation"``, ``"pretraining"``).
    :raises RLAdaptError: the run finished with other settings (the keys are named), or its record is unreadable or
        names no settings (written before runs recorded them).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RLAdaptError(f"{path}: this {what} has finished, but its record is unreadable ({exc})") from exc
    then = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(then, dict):
        raise RLAdaptError(f"{path.parent}: this {what} has finished (recorded without its settings, by an earlier "
                           "version): nothing to resume")
    now = json.loads(json.dumps(settings, default=str))
    if then != now:
        diff = differences(then, now)
        what_differs = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise RLAdaptError(f"{path.parent}: this {what} has finished with other settings ({what_differs}); choose a "
                           "new output folder")
    log.info("%s: this %s has finished with these settings: nothing to redo", path.parent, what)
    return record
