"""The demo's stage list and the runner that starts its stages side by side (the stages themselves are the CLI
commands tested elsewhere)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rl_adapt.commands.demo import DemoConfig, Stage, demo_stages, run_stages
from rl_adapt.errors import RLAdaptError


def test_in_domain_reference_adds_a_labelled_target_set_and_a_model_trained_like_the_source(tmp_path):
    base = {s.name: s for s in demo_stages(DemoConfig(), tmp_path)}
    cfg = DemoConfig(target_domain="target-shadow", in_domain_reference=True,
                     extra_overrides={"pretrain": ["train.epochs=15"]})
    stages = {s.name: s for s in demo_stages(cfg, tmp_path)}
    assert set(stages) == set(base) | {"synth target in-domain", "pretrain in-domain"}
    synth, pre = stages["synth target in-domain"], stages["pretrain in-domain"]
    assert synth.output == tmp_path / "data" / "target_in_domain" and pre.output == tmp_path / "in_domain_model"
    # labelled (no --no-labels), the target vendor, patients other than the adaptation and test ones
    assert "--no-labels" not in synth.args and synth.args[synth.args.index("--domain") + 1] == "target-shadow"
    assert synth.args[synth.args.index("--first-patient") + 1] == "6001"
    assert synth.args[synth.args.index("--patients") + 1] == str(cfg.target_patients)
    # the same pretraining config and overrides as the source model, on the in-domain data
    source_pre = stages["pretrain"].args
    assert pre.args[pre.args.index("--data") + 1] == str(synth.output) and pre.needs == ("synth target in-domain",)
    assert pre.args[pre.args.index("--config"):] == source_pre[source_pre.index("--config"):]
    # evaluate waits for every other stage and compares the in-domain model too
    assert set(stages["evaluate"].needs) == set(stages) - {"evaluate"}
    assert "in_domain={in_domain}" in stages["evaluate"].args


def test_every_stage_needs_only_stages_that_come_before_it_and_the_long_ones_resume(tmp_path):
    stages = demo_stages(DemoConfig(in_domain_reference=True), tmp_path)
    names = [s.name for s in stages]
    for i, s in enumerate(stages):
        assert set(s.needs) <= set(names[:i]), s.name
    adapt = next(s for s in stages if s.name == "adapt (RL)")
    assert adapt.resumable and adapt.done_file == tmp_path / "adapt" / "model"
    for stage in (s for s in stages if s.name.startswith("baseline") or s.name == "evaluate"):
        # an interrupted baseline or evaluation leaves its output folder with unfinished/ only: not done, resumed
        assert stage.resumable
        (stage.output / "unfinished").mkdir(parents=True)
        assert not stage.done()
    for pre in (s for s in stages if s.name.startswith("pretrain")):
        # an interrupted pretraining leaves its output folder with unfinished_pretrain/ only: not done, resumed
        assert pre.resumable and not pre.done()
        (pre.output / "unfinished_pretrain" / "Dataset910_X__nnUNetTrainer__nnUNetPlansSmall__2d__fold_0").mkdir(
            parents=True)
        assert not pre.done()
        fold = pre.output / "Dataset910_X" / "nnUNetTrainer__nnUNetPlansSmall__2d" / "fold_0"
        fold.mkdir(parents=True)
        (fold / "checkpoint_final.pth").write_bytes(b"")
        assert pre.done()


def _synth(tmp_path: Path, name: str, needs=()) -> Stage:
    out = tmp_path / name
    return Stage(name, out, ["synth", "--domain", "source", "--patients", "1", "--size", "48", "--out", str(out)],
                 needs=tuple(needs))


def test_runner_runs_independent_stages_side_by_side_and_dependents_after(tmp_path):
    stages = [_synth(tmp_path, "a"), _synth(tmp_path, "b"), _synth(tmp_path, "c", needs=("a", "b"))]
    starts = {}

    def prepare(stage):
        starts[stage.name] = [s.name for s in stages if (tmp_path / s.name).exists()]  # finished before this one
        return list(stage.args)

    timings, ran = run_stages(stages, jobs=2, logs=tmp_path / "logs", prepare=prepare)
    assert sorted(ran) == ["a", "b", "c"] and ran[-1] == "c"
    assert starts["a"] == [] and starts["b"] == []  # both started before either finished
    assert sorted(starts["c"]) == ["a", "b"]
    assert all((tmp_path / "logs" / f"{n}.log").is_file() for n in "abc")
    # done stages are skipped on the next call
    timings, ran = run_stages(stages, jobs=2, logs=tmp_path / "logs")
    assert ran == [] and timings == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_a_failed_stage_is_named_with_the_end_of_its_log(tmp_path):
    bad = Stage("broken", tmp_path / "x", ["synth", "--domain", "no-such-vendor", "--out", str(tmp_path / "x")])
    with pytest.raises(RLAdaptError, match=r"demo stage 'broken' failed .*broken\.log"):
        run_stages([bad, _synth(tmp_path, "after", needs=("broken",))], jobs=2, logs=tmp_path / "logs")
    assert not (tmp_path / "after").exists()
