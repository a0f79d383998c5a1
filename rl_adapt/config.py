"""Typed configuration: dataclasses loaded from plain YAML, overridable with ``--set a.b=value``.

Rules (they keep runs reproducible and configs honest):

* every config is a (nested) dataclass; each field has a type and a docstring under it in the source;
* YAML is read with ``yaml.safe_load`` (no expressions, no tags), unknown keys are an error naming the key
  and the file, and values are checked against the field types;
* ``--set section.field=value`` overrides parse ``value`` as YAML (``1e-5``, ``true``, ``[1, 2]``);
* a field's allowed values (range, choices) are declared once, next to the field, with :func:`bounded`
  (stored in the field's metadata), checked when a config is loaded and shown by :func:`describe_fields`;
* the config used by a run is written next to its outputs (:func:`save_config`) and can be reloaded.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from rl_adapt.errors import ConfigError
from rl_adapt.io_utils import write_text_atomic

T = TypeVar("T")

BOUNDS_KEY = "bounds"
"""Field-metadata key holding a :class:`Bounds` (set by :func:`bounded`)."""

DOC_KEY = "doc"
"""Field-metadata key holding a one-line description (else the docstring under the field is used)."""

_BOUND_NAMES = ("ge", "gt", "le", "lt", "choices")


def _fmt(value: Any) -> str:
    """A value as it would be written in YAML (``true``, ``null``, ``[1, 2]``, ``0.0001``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value.strip() and value == value.strip() else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Allowed values of a config field: an interval (``ge``/``gt`` below, ``le``/``lt`` above) and/or choices.

    For a list or tuple field the bounds apply to every element. NaN is never inside an interval.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None

    def __post_init__(self) -> None:
        if self.ge is not None and self.gt is not None or self.le is not None and self.lt is not None:
            raise TypeError("give at most one lower bound (ge or gt) and one upper bound (le or lt)")
        lo = self.ge if self.ge is not None else self.gt
        hi = self.le if self.le is not None else self.lt
        if lo is not None and hi is not None and (lo > hi or lo == hi and (self.gt is not None or self.lt is not None)):
            raise ValueError(f"empty range: {self.describe()}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    def _interval(self) -> str:
        return " and ".join(f"{op} {_fmt(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le),
                                                             ("<", self.lt)) if v is not None)

    def describe(self) -> str:
        """The allowed values in words, e.g. ``>= 1``, ``> 0 and <= 1`` or ``one of adam, sgd``."""
        parts = [] if self.choices is None else ["one of " + ", ".join(_fmt(c) for c in self.choices)]
        return "; ".join(parts + ([self._interval()] if self._interval() else []))

    def problem(self, value: Any) -> str | None:
        """Why ``value`` (one scalar) is not allowed, in words; None when it is."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"is not one of {list(self.choices)}"
        tests = [(self.ge, lambda v, b: v >= b), (self.gt, lambda v, b: v > b), (self.le, lambda v, b: v <= b),
                 (self.lt, lambda v, b: v < b)]
        limits = [(b, ok) for b, ok in tests if b is not None]
        if not limits:
            return None
        try:
            inside = all(ok(value, b) for b, ok in limits)
        except TypeError:
            return f"cannot be compared with the range ({self.describe()})"
        if not inside or (isinstance(value, float) and math.isnan(value)):
            return f"is out of range (must be {self._interval()})"
        return None


def bounded(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
            choices: Iterable | None = None, doc: str | None = None, **field_kwargs: Any) -> Any:
    """A dataclass field with its allowed values declared next to it.

    ``epochs: int = bounded(10, ge=1)`` or ``optimizer: str = bounded("adam", choices=("adam", "sgd"))``:
    the bounds go into the field's metadata (:data:`BOUNDS_KEY`), :func:`from_dict` checks them when a
    config is loaded (:class:`~rl_adapt.errors.ConfigError` naming key, value and range) and
    :func:`describe_fields` shows them. A lower/upper bound is ``ge``/``gt`` (>=, >) and ``le``/``lt`` (<=, <).

    :param doc: one-line description for :func:`describe_fields` (default: the docstring under the field).
    :param field_kwargs: passed on to :func:`dataclasses.field` (``metadata`` is merged).
    :raises ValueError: the default itself is outside the bounds; TypeError: two lower or two upper bounds.
    """
    bounds = Bounds(ge, gt, le, lt, None if choices is None else tuple(choices))
    if default is not dataclasses.MISSING:
        problem = _bounds_problem(bounds, default, "default")
        if problem:
            raise ValueError(problem)
    metadata = dict(field_kwargs.pop("metadata", None) or {})
    metadata[BOUNDS_KEY] = bounds
    if doc is not None:
        metadata[DOC_KEY] = doc
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata, **field_kwargs)


def field_bounds(f: dataclasses.Field) -> Bounds | None:
    """The :class:`Bounds` declared for a field: metadata[:data:`BOUNDS_KEY`], or plain metadata keys
    ``ge``/``gt``/``le``/``lt``/``choices``; None when the field has no declared bounds."""
    if isinstance(f.metadata.get(BOUNDS_KEY), Bounds):
        return f.metadata[BOUNDS_KEY]
    plain = {k: f.metadata[k] for k in _BOUND_NAMES if k in f.metadata}
    return Bounds(**plain) if plain else None


def _bounds_problem(bounds: Bounds, value: Any, where: str) -> str | None:
    """``"<where>: <value> is out of range (...)"`` for the first offending (element of the) value, or None."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = _bounds_problem(bounds, item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    problem = bounds.problem(value)
    return f"{where}: {value!r} {problem}" if problem else None


def bounds_problem(cfg: Any, where: str = "config") -> str | None:
    """The first field of a config dataclass instance (recursively) outside its declared bounds, in words
    (``"<where>.<key>: <value> is out of range (must be ...)"``); None when every field is allowed.

    Use it in a ``__post_init__`` that must raise ``ValueError`` for configs built in code.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            problem = bounds_problem(value, f"{where}.{f.name}")
        else:
            bounds = field_bounds(f)
            problem = bounds and _bounds_problem(bounds, value, f"{where}.{f.name}")
        if problem:
            return problem
    return None


def check_bounds(cfg: Any, where: str = "config") -> None:
    """Check every field of a config dataclass instance (recursively) against its declared bounds.

    :func:`from_dict` already does this for loaded configs; call it for configs built in code.
    :raises ConfigError: ``"<where>.<key>: <value> is out of range (must be ...)"``.
    """
    problem = bounds_problem(cfg, where)
    if problem:
        raise ConfigError(problem)


def check_value(cls: type, name: str, value: Any, where: str) -> None:
    """Check one value against the bounds the config dataclass ``cls`` declares for its field ``name``.

    For a command-line option that fills a config field (``rl-adapt evaluate --overlays N``): the message names
    the option, e.g. ``"--overlays: -1 is out of range (must be >= 0)"``.

    :param where: what the message names (the option).
    :raises ConfigError: the value is outside the field's bounds.
    """
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    bounds = field_bounds(f)
    problem = bounds and _bounds_problem(bounds, value, where)
    if problem:
        raise ConfigError(problem)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build the dataclass ``cls`` from a mapping; unknown keys and wrong types raise :class:`ConfigError`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys for {cls.__name__}: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
        bounds = field_bounds(fields[name])
        problem = bounds and _bounds_problem(bounds, kwargs[name], f"{where}.{name}")
        if problem:
            raise ConfigError(problem)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return obj


def to_dict(cfg: Any) -> dict:
    """Plain-dict view of a config dataclass (tuples become lists), suitable for YAML or JSON."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parser error in one line: what is wrong and where (``line 2, column 11: expected ',' or ']' ...``)."""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    mark = getattr(exc, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def parse_overrides(overrides: Iterable[str]) -> dict:
    """Turn ``["ppo.lr=1e-5", "seed=3"]`` into a nested dict (values parsed as YAML scalars/lists)."""
    out: dict = {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. ppo.lr=1e-5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({yaml_problem(exc)})") from None
        _set_dotted(out, key, value)
    return out


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with ``safe_load``; a missing or malformed file raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Defaults of ``cls``, then the YAML file at ``path`` (if any), then ``--set`` overrides.

    :raises ConfigError: unknown keys, wrong types, or a malformed file/override, naming where.
    """
    data = to_dict(cls())
    where = str(path) if path is not None else cls.__name__
    if path is not None:
        data = _merge(data, read_yaml(path))
    extra = parse_overrides(overrides)
    if extra:
        data = _merge(data, extra)
        where = f"{where} (with --set)"
    return from_dict(cls, data, where)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (the exact config a run used)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ------------------------------------------------------------------------------------------- help text
def _attribute_docs(cls: type) -> dict[str, str]:
    """First line of the docstring written under each field in the source of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = (inspect.cleandoc(nxt.value.value).splitlines() or [""])[0]
    return docs


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _allowed(f: dataclasses.Field, tp: Any) -> str:
    """Declared bounds in words, else the values of a ``Literal`` annotation; "" for a free field."""
    bounds = field_bounds(f)
    if bounds is not None:
        return bounds.describe()
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) is typing.Literal:
            return "one of " + ", ".join(_fmt(a) for a in typing.get_args(arg))
    return ""


def _field_rows(cls: type, prefix: str) -> list[tuple[str, str]]:
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default, tp = _default_of(f), hints.get(f.name)
        section = tp if dataclasses.is_dataclass(tp) else type(default) if dataclasses.is_dataclass(default) else None
        if section is not None:
            rows += _field_rows(section, f"{prefix}{f.name}.")
            continue
        shown = "(required)" if default is dataclasses.MISSING else _fmt(default)
        allowed = _allowed(f, tp)
        doc = f.metadata.get(DOC_KEY) or docs.get(f.name, "")
        right = "  ".join(part for part in (f"[{allowed}]" if allowed else "", doc) if part)
        rows.append((f"{prefix}{f.name} = {shown}", right))
    return rows


def describe_fields(cls: type, prefix: str = "") -> str:
    """Help text for the fields of a config dataclass: one line per field, nested sections flattened.

    Each line reads ``section.key = default  [allowed values]  first line of the field's docstring``, the
    defaults written as in YAML, so they can be copied into a config file or a ``--set`` override; the
    allowed values are the field's declared :class:`Bounds` or the values of a ``Literal`` annotation.

    :param cls: a config dataclass (not an instance).
    :param prefix: prepended to every key (e.g. ``"ppo."``).
    :returns: the lines joined with newlines, left parts padded to one width.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    rows = _field_rows(cls, prefix)
    width = max((len(left) for left, _ in rows), default=0)
    return "\n".join(f"{left:<{width}}  {right}".rstrip() for left, right in rows)


# ----------------------------------------------------------------------------- comparing saved settings
def config_sha(config_dict: dict) -> str:
    """Stable SHA-256 (hex, 16 chars) of a config dict; used to refuse resuming with another config."""
    blob = json.dumps(config_dict, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def differences(then: dict, now: dict) -> list[str]:
    """Human-readable differences of two nested settings dicts: ``"cfg.ppo.lr: 0.0001 then, 1e-05 now"``; the
    ``inputs.`` prefix is shown as the command-line flag (``--target``)."""
    a, b = _flat(then), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            name = key[len("cfg."):] if key.startswith("cfg.") else key
            if name.startswith("inputs."):
                name = "--" + name[len("inputs."):].replace("_dir", "").replace("_", "-")
            out.append(f"{name}: {a.get(key, 'unset')} then, {b.get(key, 'unset')} now")
    return out
