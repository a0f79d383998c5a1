"""Run-state bookkeeping: marks survive reloads, another config is refused, state is valid JSON."""
import json

import pytest

from rl_adapt.config import config_sha
from rl_adapt.engine.run_state import RunState
from rl_adapt.errors import RLAdaptError


def test_marks_persist_and_config_is_checked(tmp_path):
    sha = config_sha({"a": 1})
    st = RunState(tmp_path, sha)
    assert not st.done("iter0/rollout")
    st.mark("iter0/rollout", {"n": 3})
    again = RunState(tmp_path, sha)
    assert again.done("iter0/rollout") and again.info("iter0/rollout") == {"n": 3}
    assert json.loads((tmp_path / "state.json").read_text())["completed"]["iter0/rollout"] == {"n": 3}
    with pytest.raises(RLAdaptError, match="started with other settings"):
        RunState(tmp_path, config_sha({"a": 2}))


def test_a_resume_with_other_settings_names_what_differs(tmp_path):
    then = {"cfg": {"seed": 0, "ppo": {"lr": 1e-4}}, "inputs": {"target_dir": "/data/a", "expert_dir": None}}
    st = RunState(tmp_path, config_sha(then), then)
    st.mark("iter0/rollout", {})
    now = {"cfg": {"seed": 0, "ppo": {"lr": 1e-5}}, "inputs": {"target_dir": "/data/b", "expert_dir": None}}
    with pytest.raises(RLAdaptError) as err:
        RunState(tmp_path, config_sha(now), now)
    msg = str(err.value)
    assert "ppo.lr: 0.0001 then, 1e-05 now" in msg and "--target: /data/a then, /data/b now" in msg
    assert "seed" not in msg and "expert" not in msg


def test_corrupt_state_is_a_clear_error(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(RLAdaptError, match="unreadable run state"):
        RunState(tmp_path, "x")
