"""Loading a run config from TOML or a dict, with errors that name the field, the value and the fix."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from .config_errors import ConfigError
from .run_config import RunConfig


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a TOML value to field type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(typing.get_args(tp), value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and bad values name their field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(prefix + u for u in unknown)}; "
                          f"known fields: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(prefix + msg if where and not msg.startswith(prefix) else msg) from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run configuration from a TOML file (tables: model, data, ul2, optim, train)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"run config {path} does not exist; pass the path of a TOML file "
                          "(see deploy/run-configs/ for examples)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"run config {path} is not valid TOML: {e}") from None
    run = from_dict(RunConfig, raw)
    if not Path(run.coordinator.state_path).is_absolute():
        run.coordinator.state_path = str((path.parent / run.coordinator.state_path).resolve())
    # Relative local data paths are relative to the config file, so a config works from any
    # directory; hub ids ('org/name') do not exist as files there and are left alone.
    for source in run.data.sources + run.data.heldout:
        candidate = path.parent / source.path
        if not Path(source.path).is_absolute() and (candidate.exists() or source.path.startswith(".")):
            source.path = str(candidate.resolve())
    return run
