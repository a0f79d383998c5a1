"""Running one stage of a resumable run: return the saved result if the stage is done, otherwise compute it,
save it atomically, mark it finished, log its figures, and hand the result on in memory.

A stage's result is a typed object that knows how to write itself (``save(path)``, atomically) and how to be read
back (a ``load(path)`` function given to :meth:`Stages.run`). The adaptation loop is a chain of such results:
:class:`~rl_adapt.engine.rollout.Rollout` -> :class:`~rl_adapt.engine.corrector.Corrections` ->
:class:`~rl_adapt.engine.reward.network.RewardNet` -> :class:`~rl_adapt.engine.ppo.PolicyWeights`.

Because a result is written (atomically, every file) before its stage is marked in ``state.json``, a run killed at
any moment either has a stage's outputs and its mark, or redoes that stage from scratch on resume.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, TypeVar

from rl_adapt.config import config_sha
from rl_adapt.distributed import SINGLE, World, barrier
from rl_adapt.engine.run_state import RunState
from rl_adapt.io_utils import append_jsonl

log = logging.getLogger(__name__)


class StageResult(Protocol):
    """What a stage returns: something that writes itself to ``path`` atomically."""

    def save(self, path: Path) -> None:
        """Write the result to ``path`` (a file, or a folder for results of several files), atomically."""


R = TypeVar("R", bound=StageResult)


class Stages:
    """The finished-stage bookkeeping and the metrics log of one run folder.

    :param state: the run's :class:`~rl_adapt.engine.run_state.RunState` (``state.json``).
    :param metrics_path: ``metrics.jsonl``: one JSON line per finished stage with its figures.
    :param world: the data-parallel job: rank 0 writes results, state and metrics; see :meth:`run`.
    """

    def __init__(self, state: RunState, metrics_path: Path, world: World = SINGLE) -> None:
        self.state = state
        self.metrics_path = Path(metrics_path)
        self.world = world
        if world.main:
            self._restore_missing_records()

    def _restore_missing_records(self) -> None:
        """A run killed between marking a stage (``state.json``) and logging it (``metrics.jsonl``) lost that line:
        append it again from the figures the state kept (with ``"restored": true``), in the state's order. A line
        torn by the kill is ignored."""
        if not self.state.completed:
            return
        logged = set()
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    logged.add(json.loads(line).get("stage"))
                except (json.JSONDecodeError, AttributeError):
                    continue
        for name, info in self.state.completed.items():
            if name not in logged:
                append_jsonl(self.metrics_path, {"stage": name, "time": time.time(), "restored": True, **info})
                log.info("%s: its metrics line was lost when the run was killed; restored from state.json", name)

    def done(self, name: str) -> bool:
        """Whether stage ``name`` finished (in this process or an earlier one)."""
        return self.state.done(name)

    def info(self, name: str) -> dict[str, Any]:
        """The figures stage ``name`` recorded when it finished (empty if it did not)."""
        return self.state.info(name)

    def log(self, name: str, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` under ``name`` and log its scalar figures (rank 0 only)."""
        if not self.world.main:
            return
        append_jsonl(self.metrics_path, {"stage": name, "time": time.time(), **record})
        log.info("%s: %s", name, {k: v for k, v in record.items() if not isinstance(v, (list, dict))})

    def mark(self, name: str, info: dict[str, Any]) -> None:
        """Record ``name`` as finished with ``info`` (state.json) and log it (metrics.jsonl); the other ranks of a
        data-parallel job only remember it."""
        if not self.world.main:
            self.state.completed[name] = dict(info)
            return
        self.state.mark(name, info)
        self.log(name, info)

    def run(self, name: str, path: Path, compute: Callable[[], tuple[R, dict[str, Any]]],
            load: Callable[[Path], R], parallel: bool = False) -> R:
        """Stage ``name``: ``load(path)`` if it is done; else ``compute()``, save, mark, log, return in memory.

        In a data-parallel job rank 0 saves and marks. A ``parallel`` stage is computed by every rank together
        (its ``compute`` shards or all-reduces, and every rank ends with the same result); another stage is
        computed by rank 0 alone while the others wait, then read its saved result. Either way every rank returns
        only once the result is saved, so any rank may read ``path`` next (a rank that ran ahead of rank 0's save
        once failed to find a parallel stage's file).

        :param name: the stage's name in ``state.json`` and ``metrics.jsonl`` (e.g. ``iter0/rollout``).
        :param path: where the result is saved (its ``save(path)`` writes atomically).
        :param compute: returns ``(result, figures)``; the figures (JSON-ready scalars) go to state and metrics,
            with ``seconds`` added.
        :param load: reads a saved result back (used only when the stage finished in an earlier process).
        """
        if self.state.done(name):
            return load(path)
        if not parallel and not self.world.main:
            barrier(self.world)  # rank 0 computes, saves and marks it
            self.state.reload()
            return load(path)
        t0 = time.time()
        result, info = compute()
        if self.world.main:
            result.save(path)
        self.mark(name, {**info, "seconds": time.time() - t0})
        barrier(self.world)  # the file is saved and marked before any rank goes on
        return result


@contextmanager
def kept_stages(out: Path, work: Path, settings: dict[str, Any], what: str) -> Iterator[Stages]:
    """The :class:`Stages` of a single-process command whose finished stages are kept in ``work`` (inside ``out``)
    until the command writes its results.

    A resume with other ``settings`` than the unfinished run's is refused here, naming the keys
    (:class:`~rl_adapt.engine.run_state.RunState`). If the body fails or is interrupted before any stage finished
    and ``out`` did not exist before, ``out`` is removed: nothing is left behind.

    :param out: the command's output folder.
    :param work: the folder of ``state.json`` and ``metrics.jsonl`` (``out/unfinished``).
    :param settings: the inputs and config that a resume must share (JSON-ready).
    :param what: the command's work in the log line of a resume (``"baseline"``, ``"evaluation"``).
    """
    created = not out.exists()
    state = RunState(work, config_sha(settings), settings)
    if state.completed:
        log.info("resuming the %s in %s (finished: %s)", what, out, ", ".join(state.completed))
    try:
        yield Stages(state, work / "metrics.jsonl")
    except BaseException:
        if created and not state.completed:
            shutil.rmtree(out, ignore_errors=True)
        raise
