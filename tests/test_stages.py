"""The stage helper: a finished stage's saved result is read back, an interrupted one is computed again, and a
result is written atomically before its stage is marked."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from rl_adapt.engine.run_state import RunState
from rl_adapt.engine.stages import Stages, kept_stages
from rl_adapt.errors import RLAdaptError
from rl_adapt.io_utils import atomic_path


@dataclass
class Number:
    value: int

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(str(self.value))

    @classmethod
    def load(cls, path: Path) -> "Number":
        return cls(int(path.read_text()))


def _stages(folder: Path) -> Stages:
    return Stages(RunState(folder, "sha"), folder / "metrics.jsonl")


def test_a_stage_is_computed_once_then_read_back(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return Number(7), {"figure": 1.5}

    first = _stages(tmp_path).run("s", tmp_path / "s.txt", compute, Number.load)
    assert first == Number(7) and calls == [1]
    again = _stages(tmp_path).run("s", tmp_path / "s.txt", compute, Number.load)  # a new process: read, not computed
    assert again == Number(7) and calls == [1]
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["stage"] == "s" and record["figure"] == 1.5 and record["seconds"] >= 0
    assert json.loads((tmp_path / "state.json").read_text())["completed"]["s"]["figure"] == 1.5


def test_the_result_in_memory_is_handed_on_not_reloaded(tmp_path):
    made = Number(3)
    out = _stages(tmp_path).run("s", tmp_path / "s.txt", lambda: (made, {}), Number.load)
    assert out is made


def test_an_interrupted_stage_is_computed_again_and_leaves_no_partial_file(tmp_path):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _stages(tmp_path).run("s", tmp_path / "s.txt", interrupted, Number.load)
    assert not (tmp_path / "s.txt").exists() and not _stages(tmp_path).done("s")

    class Broken(Number):
        def save(self, path: Path) -> None:  # killed while writing: the temporary file never replaces the target
            with atomic_path(path) as tmp:
                tmp.write_text("partial")
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _stages(tmp_path).run("s", tmp_path / "s.txt", lambda: (Broken(1), {}), Number.load)
    assert not (tmp_path / "s.txt").exists() and not list(tmp_path.glob("*.tmp-*"))
    assert not _stages(tmp_path).done("s")
    assert _stages(tmp_path).run("s", tmp_path / "s.txt", lambda: (Number(5), {}), Number.load) == Number(5)


def test_a_stage_marked_but_not_logged_before_a_kill_gets_its_metrics_line_back(tmp_path):
    """A kill between ``state.json`` and ``metrics.jsonl``: the next process restores the lost line from the state's
    figures (once), and a line torn by the kill does not stop it."""
    stages = _stages(tmp_path)
    stages.run("a", tmp_path / "a.txt", lambda: (Number(1), {"figure": 1.0}), Number.load)
    stages.state.mark("b", {"figure": 2.0})  # marked; the process died before logging it
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "c", "fig')  # and a torn line
    _stages(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    _stages(tmp_path)  # a second resume adds nothing more
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines
    assert lines[1] == '{"stage": "c", "fig'  # the torn line is left as it was, the restored one follows it
    records = [json.loads(line) for i, line in enumerate(lines) if i != 1]
    assert [r["stage"] for r in records] == ["a", "b"]
    assert records[1]["figure"] == 2.0 and records[1]["restored"] is True and "restored" not in records[0]


def test_kept_stages_leaves_nothing_only_when_nothing_finished_in_a_folder_it_made(tmp_path):
    settings = {"cfg": {"a": 1}}
    out = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        with kept_stages(out, out / "unfinished", settings, "test"):
            raise KeyboardInterrupt  # killed before any stage finished
    assert not out.exists()

    with pytest.raises(RuntimeError):
        with kept_stages(out, out / "unfinished", settings, "test") as stages:
            stages.run("s", out / "unfinished" / "s.txt", lambda: (Number(4), {}), Number.load)
            raise RuntimeError("after the first stage")
    assert (out / "unfinished" / "s.txt").read_text() == "4"  # the finished stage is kept for a resume
    with kept_stages(out, out / "unfinished", settings, "test") as stages:  # the resume reads it back
        assert stages.done("s")
        assert stages.run("s", out / "unfinished" / "s.txt", lambda: (Number(0), {}), Number.load) == Number(4)

    with pytest.raises(RLAdaptError, match=r"other settings \(a: 1 then, 2 now\)"):  # refused, naming the key
        with kept_stages(out, out / "unfinished", {"cfg": {"a": 2}}, "test"):
            pass
    assert (out / "unfinished" / "s.txt").is_file()

    mine = tmp_path / "the user's"
    mine.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with kept_stages(mine, mine / "unfinished", settings, "test"):
            raise KeyboardInterrupt
    assert mine.is_dir()  # a folder that existed before is never removed
