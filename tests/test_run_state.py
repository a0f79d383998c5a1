"""Run-state bookkeeping: marks survive reloads, another config is refused, state is valid JSON."""
import json

import pytest

from rl_adapt.errors import RLAdaptError
from rl_adapt.engine.run_state import RunState, config_sha


def test_marks_persist_and_config_is_checked(tmp_path):
    sha = config_sha({"a": 1})
    st = RunState(tmp_path, sha)
    assert not st.done("iter0/rollout")
    st.mark("iter0/rollout", {"n": 3})
    again = RunState(tmp_path, sha)
    assert again.done("iter0/rollout") and again.info("iter0/rollout") == {"n": 3}
    assert json.loads((tmp_path / "state.json").read_text())["completed"]["iter0/rollout"] == {"n": 3}
    with pytest.raises(RLAdaptError, match="another configuration"):
        RunState(tmp_path, config_sha({"a": 2}))


def test_corrupt_state_is_a_clear_error(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(RLAdaptError, match="unreadable run state"):
        RunState(tmp_path, "x")
