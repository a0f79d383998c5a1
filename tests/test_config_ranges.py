"""Config value ranges and choices: declared once next to a field, checked on load, shown as help text."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from rl_adapt.config import (Bounds, bounded, check_bounds, describe_fields, field_bounds, from_dict, load_config,
                             save_config, to_dict)
from rl_adapt.errors import ConfigError


@dataclass
class _Train:
    epochs: int = bounded(10, ge=1)
    """Passes over the data.

    Second paragraph, not shown in help."""
    lr: float = bounded(3e-4, gt=0, le=1)
    """Learning rate."""
    optimizer: str = bounded("adam", choices=("adam", "sgd"))
    """Optimiser."""
    clip: Optional[float] = bounded(None, gt=0)
    """Gradient-norm clip (null: none)."""
    sizes: tuple[int, ...] = bounded((32, 64), ge=8, lt=1024, doc="Image sides tried, pixels.")
    """Ignored: the doc argument wins."""
    warmup: int = field(default=0, metadata={"ge": 0})
    """Warm-up steps (bounds as plain metadata keys)."""
    mode: Literal["fast", "exact"] = "fast"
    """Literal choices."""
    tag: str = ""


@dataclass
class _Run:
    seed: int = bounded(0, ge=0)
    """Random seed."""
    train: _Train = field(default_factory=_Train)
    """Training section."""
    gamma: float = 0.99

    def __post_init__(self):
        if self.gamma > 1:
            raise ValueError(f"gamma {self.gamma} > 1")


OUT_OF_RANGE = [
    ("train.epochs=-3", "train.epochs: -3 is out of range (must be >= 1)"),
    ("train.epochs=0", "train.epochs: 0 is out of range (must be >= 1)"),
    ("train.lr=0", "train.lr: 0.0 is out of range (must be > 0 and <= 1)"),
    ("train.lr=1.5", "train.lr: 1.5 is out of range (must be > 0 and <= 1)"),
    ("train.lr=.nan", "train.lr: nan is out of range (must be > 0 and <= 1)"),
    ("train.optimizer=rmsprop", "train.optimizer: 'rmsprop' is not one of ['adam', 'sgd']"),
    ("train.clip=-1", "train.clip: -1.0 is out of range (must be > 0)"),
    ("train.sizes=[32, 4]", "train.sizes[1]: 4 is out of range (must be >= 8 and < 1024)"),
    ("train.sizes=[1024]", "train.sizes[0]: 1024 is out of range (must be >= 8 and < 1024)"),
    ("train.warmup=-1", "train.warmup: -1 is out of range (must be >= 0)"),
    ("seed=-2", "seed: -2 is out of range (must be >= 0)"),
    ("train.mode=slow", "train.mode: 'slow' is not one of ['fast', 'exact']"),
    ("gamma=2", "gamma 2.0 > 1"),  # __post_init__ ValueError still becomes a ConfigError
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_override_names_key_value_and_range(override: str, message: str):
    with pytest.raises(ConfigError) as info:
        load_config(_Run, None, [override])
    assert message in str(info.value)


def test_out_of_range_file_value_names_the_file(tmp_path: Path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  epochs: -3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.epochs: -3 is out of range \(must be >= 1\)"):
        load_config(_Run, p)


@pytest.mark.parametrize("override", ["train.epochs=1", "train.lr=1", "train.lr=1e-12", "train.clip=null",
                                      "train.clip=5", "train.optimizer=sgd", "train.sizes=[8, 1023]",
                                      "train.sizes=[]", "seed=0"])
def test_values_at_the_edges_are_accepted(override: str):
    load_config(_Run, None, [override])


def test_defaults_file_and_save_round_trip_unchanged(tmp_path: Path):
    cfg = load_config(_Run)
    assert cfg == _Run() and cfg.train.sizes == (32, 64)
    out = tmp_path / "used.yaml"
    save_config(load_config(_Run, None, ["train.epochs=5"]), out)
    assert load_config(_Run, out).train.epochs == 5
    assert to_dict(cfg)["train"]["sizes"] == [32, 64]
    assert from_dict(_Run, {"seed": 4}).seed == 4


def test_check_bounds_on_configs_built_in_code():
    check_bounds(_Run())
    with pytest.raises(ConfigError, match=r"run\.train\.epochs: 0 is out of range"):
        check_bounds(_Run(train=_Train(epochs=0)), "run")


def test_declaration_errors():
    with pytest.raises(ValueError, match="default: 0 is out of range"):
        bounded(0, ge=1)
    with pytest.raises(ValueError, match=r"default\[1\]: 2 is out of range"):
        bounded((1, 2), le=1)
    with pytest.raises(ValueError, match="is not one of"):
        bounded("x", choices=("a", "b"))
    with pytest.raises(TypeError, match="at most one lower bound"):
        bounded(1, ge=0, gt=0)
    with pytest.raises(ValueError, match="empty range"):
        Bounds(gt=1, lt=1)
    assert bounded(default_factory=list, ge=0) is not None


def test_bounds_live_in_field_metadata():
    from dataclasses import fields
    by_name = {f.name: f for f in fields(_Train)}
    assert field_bounds(by_name["epochs"]) == Bounds(ge=1)
    assert field_bounds(by_name["warmup"]) == Bounds(ge=0)
    assert field_bounds(by_name["tag"]) is None
    assert Bounds(gt=0, le=1).describe() == "> 0 and <= 1"
    assert Bounds(choices=("a", "b"), ge=0).describe() == "one of a, b; >= 0"


def test_describe_fields_renders_defaults_ranges_and_docs():
    text = describe_fields(_Run)
    assert text.splitlines() == [
        "seed = 0                [>= 0]  Random seed.",
        "train.epochs = 10       [>= 1]  Passes over the data.",
        "train.lr = 0.0003       [> 0 and <= 1]  Learning rate.",
        "train.optimizer = adam  [one of adam, sgd]  Optimiser.",
        "train.clip = null       [> 0]  Gradient-norm clip (null: none).",
        "train.sizes = [32, 64]  [>= 8 and < 1024]  Image sides tried, pixels.",
        "train.warmup = 0        [>= 0]  Warm-up steps (bounds as plain metadata keys).",
        "train.mode = fast       [one of fast, exact]  Literal choices.",
        "train.tag = ''",
        "gamma = 0.99",
    ]
    assert describe_fields(_Train, prefix="train.").splitlines()[0].startswith("train.epochs = 10")
    with pytest.raises(TypeError):
        describe_fields(_Run())
