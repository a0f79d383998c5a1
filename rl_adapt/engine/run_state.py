"""Resumable run state: which stages of a run are finished, recorded atomically.

A run folder holds ``state.json``: ``{"version": 1, "completed": {stage: {...info}}, "config_sha": str}``.
A stage writes all of its outputs (atomically, each) *before* it is marked complete, so a run killed at
any moment either has a stage's outputs and its mark, or redoes that stage from scratch on resume.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from rl_adapt.errors import RLAdaptError
from rl_adapt.io_utils import write_json_atomic

log = logging.getLogger(__name__)


def config_sha(config_dict: dict) -> str:
    """Stable SHA-256 (hex, 16 chars) of a config dict; used to refuse resuming with another config."""
    blob = json.dumps(config_dict, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunState:
    """Completed-stage bookkeeping of one run folder.

    :param run_dir: the run folder (created if needed).
    :param sha: the config hash of this run; resuming with another hash raises :class:`RLAdaptError`.
    """

    def __init__(self, run_dir: str | Path, sha: str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "state.json"
        self.sha = sha
        self.completed: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise RLAdaptError(f"{self.path}: unreadable run state ({exc})") from exc
            if data.get("config_sha") != sha:
                raise RLAdaptError(
                    f"{self.path}: this run was started with another configuration "
                    f"({data.get('config_sha')} != {sha}); resume without --config/--set changes"
                )
            self.completed = dict(data.get("completed", {}))

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in this or an earlier process."""
        return stage in self.completed

    def info(self, stage: str) -> dict[str, Any]:
        """What ``stage`` recorded when it finished (empty dict if nothing)."""
        return self.completed.get(stage, {})

    def mark(self, stage: str, info: dict[str, Any] | None = None) -> None:
        """Record ``stage`` as finished (atomic rewrite of ``state.json``)."""
        self.completed[stage] = dict(info or {})
        write_json_atomic(self.path, {"version": 1, "config_sha": self.sha, "completed": self.completed})
        log.debug("stage %s complete", stage)
