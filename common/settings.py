"""The one typed layer for flowline's environment settings (FLOWLINE_* variables).

Each process declares the variables it reads as a subclass of
:class:`FlowlineBaseSettings` (pydantic-settings): a field ``window_rows`` is the
variable ``FLOWLINE_WINDOW_ROWS``, a field with a ``validation_alias`` is the variable
of that name (``MLFLOW_TRACKING_URI``). Settings are read when asked,
``SomeSettings.from_env(environ)``, never at import time; ``environ`` is any mapping
(tests pass dicts), ``os.environ`` when omitted. No ``.env`` file or secrets folder is
read: the environment is the only source, as it always was.

The value kinds below parse exactly as the hand-written ``int(...)``/``float(...)``
reads they replace, so every value accepted before is accepted now. A bad value is a
:class:`SettingsError` (a ``ValueError``) with a one-line message naming the variable
and the value, never pydantic's multi-line dump.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BeforeValidator, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as PydanticSettingsError

ENV_PREFIX = "FLOWLINE_"
DEFAULT_HOME = ".flowline"
# Longest bad value quoted in an error: the message stays one readable line.
_MAX_QUOTED = 80

# The mapping `from_env` reads; None means os.environ. A context variable rather than
# an argument because pydantic-settings builds its sources in a classmethod that sees
# no per-call data; it is per thread and per task, so concurrent reads do not mix.
_environ: ContextVar[Mapping[str, str] | None] = ContextVar("flowline_environ", default=None)


class SettingsError(ValueError):
    """A setting with a bad value; the message is one line naming the variable and value."""


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading the mapping given to `from_env`."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _environ.get()
        environ = os.environ if environ is None else environ
        # Names match exactly as spelled, as os.environ.get("FLOWLINE_...") did. The
        # source compares lower-cased names (case_sensitive=False, which the field names
        # need), so names not spelled upper-case are left out before lower-casing.
        return {name.lower(): value for name, value in environ.items() if name == name.upper()}


class FlowlineBaseSettings(BaseSettings):
    """Base of every flowline settings class: FLOWLINE_* variables, typed, read when asked.

    Defaults go through the same parsing as values from the environment
    (``validate_default``): the default home ``.flowline`` is resolved against the
    working directory when the settings are read, as a FLOWLINE_HOME value would be.
    Unknown variables are ignored; instances are frozen.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        validate_default=True,
        env_file=None,
        secrets_dir=None,
    )

    def __init__(self, **values: Any) -> None:
        """Read the settings (``values`` override the environment); bad ones: SettingsError."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(type(self).describe(exc)) from None
        except PydanticSettingsError as exc:
            raise SettingsError(_first_line(str(exc))) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Values given in code first, then the environment; no .env file, no secrets dir."""
        return init_settings, _EnvironSource(settings_cls)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """The settings from ``environ`` (default ``os.environ``); bad values: SettingsError."""
        token = _environ.set(environ)
        try:
            return cls()
        finally:
            _environ.reset(token)

    @classmethod
    def env_name(cls, field: str) -> str:
        """The variable a field (or an error's location) is read from: the field's alias,
        else FLOWLINE_ and its name upper-cased."""
        prefix = cls.model_config.get("env_prefix", "")
        for name, info in cls.model_fields.items():
            alias = info.validation_alias if isinstance(info.validation_alias, str) else None
            if field in (name, alias):
                return alias or prefix + name.upper()
        return field

    @classmethod
    def describe(cls, exc: ValidationError) -> str:
        """``exc`` as one line: each bad variable with its value and what is wrong."""
        parts = []
        for error in exc.errors(include_url=False):
            reason = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:
                parts.append(reason)
                continue
            quoted = repr(error["input"])
            if len(quoted) > _MAX_QUOTED:
                quoted = quoted[: _MAX_QUOTED - 3] + "..."
            parts.append(f"{cls.env_name(str(error['loc'][0]))}: {reason}, got {quoted}")
        return _first_line("; ".join(parts))


def _first_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


# --- the recurring value kinds ----------------------------------------------------------
# Validators take strings from the environment and pass other values (defaults and
# values given in code) through to pydantic's own checks of the declared type.


def _integer(value: Any) -> Any:
    """int(value) for a string, as the hand-written reads did (' 42 ', '+1', '1_000')."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError("must be an integer") from None
    return value


def _number(value: Any) -> Any:
    """float(value) for a string, as the hand-written reads did ('1e3', 'inf', 'nan')."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError("must be a number") from None
    return value


def _positive_integer(value: int) -> int:
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_finite(value: float) -> float:
    if not value > 0 or math.isinf(value):
        raise ValueError("must be a positive, finite number")
    return value


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number (0-65535)")
    return value


def _resolved_path(value: Any) -> Any:
    """The flowline-home rule: '~' expanded, made absolute; an empty value is the cwd."""
    if isinstance(value, str | Path):
        return Path(value).expanduser().resolve()
    return value


def _comma_list(value: Any) -> Any:
    """'a, b,,c' -> ('a', 'b', 'c'): items stripped, empty ones dropped."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _none_if_empty(value: Any) -> Any:
    return value or None


EnvInt = Annotated[int, BeforeValidator(_integer)]
"""An integer, parsed as Python's ``int()`` parses a string."""
EnvFloat = Annotated[float, BeforeValidator(_number)]
"""A number, parsed as Python's ``float()`` parses a string ('inf' and 'nan' included)."""
PositiveInt = Annotated[int, BeforeValidator(_integer), AfterValidator(_positive_integer)]
"""An integer > 0 (sizes and counts)."""
PositiveFloat = Annotated[float, BeforeValidator(_number), AfterValidator(_positive_finite)]
"""A number > 0 and finite (timeouts and intervals in seconds)."""
Port = Annotated[int, BeforeValidator(_integer), AfterValidator(_port)]
"""A TCP port, 0-65535 (0: the process picks a free one, where it supports that)."""
ResolvedPath = Annotated[Path, BeforeValidator(_resolved_path)]
"""A path with '~' expanded, made absolute against the working directory."""
CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)]
"""Comma-separated items, stripped, empty ones dropped (not JSON: NoDecode)."""
OptionalStr = Annotated[str | None, BeforeValidator(_none_if_empty)]
"""A string; unset or empty is None."""
OptionalPort = Annotated[
    int | None,
    BeforeValidator(lambda v: None if _none_if_empty(v) is None else _integer(v)),
    AfterValidator(lambda v: None if v is None else _port(v)),
]
"""A port number (0-65535); unset or empty is None (the server it names is off)."""


class HomeSettings(FlowlineBaseSettings):
    """FLOWLINE_HOME, flowline's state folder: the variable, else ./.flowline, resolved."""

    home: ResolvedPath = Path(DEFAULT_HOME)


def dataclass_values(settings: BaseSettings, target: type) -> dict[str, Any]:
    """The values of ``settings`` for the fields of the dataclass ``target`` it shares.

    A process's settings dataclass (built in code too) takes its environment values
    from its settings class field by field, each name written once, in the classes.
    """
    return {
        f.name: getattr(settings, f.name)
        for f in fields(target)
        if f.name in type(settings).model_fields
    }
