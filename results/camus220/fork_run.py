"""Copy an adaptation run and change some of its settings, keeping the stages the change cannot affect, so that
`rl-adapt adapt --resume` with the new `--set` values recomputes only the rest (a probe of a PPO or reward setting
then costs a few minutes instead of a whole run: the restyling draws and the warm start are reused as they are).

Which stages a key affects is the caller's call: a PPO key (e.g. `correction_reward_weight`,
`ppo_images_per_iteration`) leaves everything before `iter0/ppo`; `iterations` changes the schedule of every phase
after the first, so fork at `iter1/ppo`. The stages kept are those recorded before FIRST_DROPPED in state.json.

Usage: python results/camus220/fork_run.py RUN NEW_RUN FIRST_DROPPED KEY=VALUE ...
then:  rl-adapt adapt <RUN's inputs> --config <RUN's config> --set KEY=VALUE ... --out NEW_RUN --resume
"""
import json
import shutil
import sys
from pathlib import Path

from rl_adapt.config import config_sha, load_config, save_config, to_dict
from rl_adapt.engine.settings import AdaptConfig

STAGE_FILES = {"rollout": "rollout.npz", "correct": "corrected.npz", "reward": "reward_net.pt", "ppo": "policy.pt"}


def fork(run: Path, new: Path, first_dropped: str, sets: list[str]) -> list[str]:
    """Copy ``run`` to ``new`` (must not exist) with the stages from ``first_dropped`` (``iterK/STAGE``) on removed
    and the ``KEY=VALUE`` settings changed in its state; returns the names of the stages kept. The settings are read
    and overridden as ``rl-adapt adapt --config RUN/config.yaml --set ...`` reads them, so the resumed run's
    settings (and hash) are the fork's."""
    if new.exists():
        sys.exit(f"{new}: exists; choose a new folder")
    k, stage = int(first_dropped.split("/")[0][len("iter"):]), first_dropped.split("/")[1]
    cfg = load_config(AdaptConfig, run / "config.yaml", sets)
    shutil.copytree(run, new)
    state = json.loads((new / "state.json").read_text())
    names = list(state["completed"])
    kept = names[:names.index(first_dropped)] if first_dropped in names else names
    state["completed"] = {n: state["completed"][n] for n in kept}
    state["settings"]["cfg"] = to_dict(cfg)
    state["config_sha"] = config_sha(state["settings"])
    (new / "state.json").write_text(json.dumps(state, indent=1))
    save_config(cfg, new / "config.yaml")  # the record a reader of the run folder sees
    order = list(STAGE_FILES)
    for name in order[order.index(stage):]:
        (new / f"iter{k}" / STAGE_FILES[name]).unlink(missing_ok=True)
    for folder in new.glob("iter*"):
        if int(folder.name[len("iter"):]) > k:
            shutil.rmtree(folder)
    for leftover in ("model", "reward_net.pt"):
        target = new / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return kept


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    print("kept:", ", ".join(fork(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:])))
