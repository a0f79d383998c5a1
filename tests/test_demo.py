"""The demo's stage list (the stages themselves are the CLI commands tested elsewhere)."""
from pathlib import Path

from rl_adapt.demo import DemoConfig, demo_stages


def test_in_domain_reference_adds_a_labelled_target_set_and_a_model_trained_like_the_source(tmp_path):
    base = {name: args for name, _, args in demo_stages(DemoConfig(), tmp_path)}
    cfg = DemoConfig(target_domain="target-shadow", in_domain_reference=True,
                     extra_overrides={"pretrain": ["train.epochs=15"]})
    stages = demo_stages(cfg, tmp_path)
    names = [name for name, _, _ in stages]
    assert names[: len(base)] == list(base) and len(names) == len(base) + 2
    (synth_name, synth_out, synth), (pre_name, pre_out, pre) = stages[-2], stages[-1]
    assert synth_out == tmp_path / "data" / "target_in_domain" and pre_out == tmp_path / "in_domain_model"
    # labelled (no --no-labels), the target vendor, patients other than the adaptation and test ones
    assert "--no-labels" not in synth and synth[synth.index("--domain") + 1] == "target-shadow"
    assert synth[synth.index("--first-patient") + 1] == "6001"
    assert synth[synth.index("--patients") + 1] == str(cfg.target_patients)
    # the same pretraining config and overrides as the source model, on the in-domain data
    source_pre = dict((n, a) for n, _, a in stages)["pretrain"]
    assert pre[pre.index("--data") + 1] == str(Path(synth_out))
    assert pre[pre.index("--config"):] == source_pre[source_pre.index("--config"):]
