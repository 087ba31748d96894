"""ConfigError and the one check that every run-config dataclass validates its fields with."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field, the value and the fix."""


def _check(ok: bool, field_name: str, value: Any, expected: str) -> None:
    """Raise ConfigError('FIELD = VALUE is invalid: expected EXPECTED') unless `ok`.

    Private to the config modules of this package, which share it so that every message has
    the same shape; config_loading prefixes the table path (e.g. 'train.') when it loads TOML."""
    if not ok:
        raise ConfigError(f"{field_name} = {value!r} is invalid: expected {expected}")
