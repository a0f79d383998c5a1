"""Typed YAML configs: defaults, file values, --set overrides, and strict errors."""
from dataclasses import dataclass, field

from pathlib import Path

import pytest

from rl_adapt.config import load_config, save_config
from rl_adapt.errors import ConfigError


@dataclass
class _Inner:
    lr: float = 1e-4
    """learning rate"""
    epochs: int = 2
    """epochs"""


@dataclass
class _Outer:
    seed: int = 0
    """seed"""
    name: str = "x"
    """name"""
    sizes: tuple[int, ...] = (1, 2)
    """sizes"""
    inner: _Inner = field(default_factory=_Inner)
    """nested"""


def test_defaults_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\ninner:\n  lr: 0.5\n")
    cfg = load_config(_Outer, p, ["inner.epochs=7", "sizes=[4, 5, 6]"])
    assert cfg.seed == 3 and cfg.inner.lr == 0.5 and cfg.inner.epochs == 7
    assert cfg.sizes == (4, 5, 6) and cfg.name == "x"
    out = tmp_path / "used.yaml"
    save_config(cfg, out)
    assert load_config(_Outer, out) == cfg


def test_int_promotes_to_float():
    assert load_config(_Outer, None, ["inner.lr=1"]).inner.lr == 1.0


@pytest.mark.parametrize(
    "text, match",
    [
        ("sede: 3\n", "unknown key"),
        ("inner:\n  learning_rate: 3\n", "unknown key"),
        ("seed: three\n", "expected an integer"),
        ("inner: 5\n", "expected a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("seed: [\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(_Outer, p)
    assert "bad.yaml" in str(info.value)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(_Outer, None, ["inner.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(_Outer, None, ["seed"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(_Outer, "/nonexistent/c.yaml")


def test_yaml_exponent_without_dot_is_a_number():
    assert load_config(_Outer, None, ["inner.lr=1e-3"]).inner.lr == 1e-3
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(_Outer, None, ["inner.lr=fast"])


def test_atomic_files_are_readable_by_others(tmp_path):
    import os
    import stat

    from rl_adapt import io_utils

    io_utils.write_text_atomic(tmp_path / "a.txt", "x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    assert mode == 0o666 & ~io_utils._UMASK  # as open() would create it, not mkstemp's 0600


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    """Each YAML in configs/ is valid for the dataclass its name says (unknown keys would fail here)."""
    from rl_adapt.engine.loop import AdaptConfig
    from rl_adapt.evaluation.baselines import BaselineConfig
    from rl_adapt.commands.demo import DemoConfig
    from rl_adapt.training.pretrain import PretrainConfig

    cls = {"adapt": AdaptConfig, "baseline": BaselineConfig, "demo": DemoConfig, "pretrain": PretrainConfig}
    load_config(cls[name.split("_")[0].split(".")[0]], Path(__file__).resolve().parents[1] / "configs" / name)


def _help_text(command: str) -> str:
    import contextlib
    import io

    from rl_adapt.cli import build_parser

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        build_parser([command, "--help"]).parse_args([command, "--help"])
    return buf.getvalue()


def test_every_set_example_in_the_help_and_docs_is_accepted(monkeypatch):
    """Each ``--set KEY=VALUE`` shown in a command's --help, in the README or in a config docstring loads."""
    import re

    from rl_adapt.engine.loop import AdaptConfig
    from rl_adapt.evaluation.baselines import BaselineConfig
    from rl_adapt.commands.demo import DemoConfig
    from rl_adapt.training.pretrain import PretrainConfig

    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help at the terminal width, splitting examples
    classes = {"adapt": AdaptConfig, "baseline": BaselineConfig, "demo": DemoConfig, "pretrain": PretrainConfig}
    pattern = re.compile(r"--set[ =]([a-z_][\w.]*=[^\s\]`,)'\"]+)")
    checked = 0
    for command, cls in classes.items():
        examples = pattern.findall(_help_text(command))
        assert examples, f"rl-adapt {command} --help shows no --set example"
        for example in examples:
            load_config(cls, None, [example])
            checked += 1
    repo = Path(__file__).resolve().parents[1]
    docs = (repo / "README.md").read_text() + (repo / "rl_adapt" / "config.py").read_text()
    for example in pattern.findall(docs) + re.findall(r'"(ppo\.[\w.]+=[^"]+)"', docs):
        if example.split("=")[0] in ("a.b", "section.key", "section.field"):  # placeholders, not examples
            continue
        loaded = []
        for cls in classes.values():
            try:
                load_config(cls, None, [example])
                loaded.append(cls)
            except ConfigError:
                pass
        assert loaded, f"--set {example} (documented) is refused by every config"
        checked += 1
    assert checked >= 6


def test_every_shipped_config_loads_with_its_class():
    from rl_adapt.commands.demo import DemoConfig
    from rl_adapt.engine.loop import AdaptConfig
    from rl_adapt.evaluation.baselines import BaselineConfig
    from rl_adapt.training.pretrain import PretrainConfig

    repo = Path(__file__).resolve().parents[1]
    classes = {"adapt": AdaptConfig, "pretrain": PretrainConfig, "baseline": BaselineConfig, "demo": DemoConfig}
    files = sorted((repo / "configs").glob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        load_config(classes[f.stem.split("_")[0]], f)  # unknown keys, wrong types or ranges would raise
