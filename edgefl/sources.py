"""Where settings come from: a TOML file < ``EDGEFL_`` environment < CLI flags.

The sources are read, merged and validated here, and an error names the source
of the bad value (the flag, the variable or the file) in one line. Flags are
generated from the fields. Never reads the network or starts anything.
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

from .errors import EdgeflError

#: ``EDGEFL_`` variables read by other commands, not settings of a role.
OTHER_VARIABLES = frozenset({"EDGEFL_NEW_PASSWORD", "EDGEFL_MONITOR_PASSWORD"})


class ConfigError(EdgeflError, ValueError):
    """Settings that cannot be used; the message is one line meant for the user."""


S = TypeVar("S", bound=BaseSettings)
B = TypeVar("B")


def load_settings(
    cls: type[S],
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> S:
    """Build settings from ``defaults``, a TOML file, ``EDGEFL_*`` variables, then
    ``overrides``; later ones win.

    ``flags`` names the flag of each dotted override, so that an error says which
    source the bad value came from. Raises ``ConfigError`` with one readable line.
    """
    path = Path(config) if config else None
    if path is not None and not _is_file(path):
        raise ConfigError(f"config file {str(path)[:200]} does not exist")
    try:
        from_file = TomlConfigSettingsSource(cls, toml_file=path)() if path else {}
        named = any(name.upper().startswith("EDGEFL_") for name in os.environ)
        from_env = EnvSettingsSource(cls)() if named else {}
    except (ValueError, OSError) as exc:  # TOML syntax errors, unreadable files, bad JSON
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}".splitlines()[0]) from None
    unknown = unknown_variables(cls, os.environ) if named else []
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown setting")
    maps = {dotted for dotted, info in iter_fields(cls) if is_structured(info.annotation)}
    given = dict(flags or {})
    given.update({d: env_name(d) for d in _dotted(from_env, maps) if d not in given})
    merged: dict[str, Any] = {}
    for layer in (defaults or {}, from_file, from_env, overrides or {}):
        merged = merge(merged, layer, maps)
    return validated(cls, merged, path, given)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system
        return False


def validated(
    cls: type[S], values: Mapping[str, Any], path: Path | None, given: Mapping[str, str]
) -> S:
    """``cls`` from ``values`` alone (no environment); ``ConfigError`` naming the source."""
    try:
        return values_only(cls)(**values)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, path, given)) from None


#: ``cls -> cls`` reading only its arguments, made once per settings class.
_VALUES_ONLY: dict[type[Any], type[Any]] = {}


def values_only(cls: type[B]) -> type[B]:
    """``cls`` reading only its arguments: the sources are merged by the caller."""
    found = _VALUES_ONLY.get(cls)
    if found is None:

        class Values(cls):  # type: ignore[valid-type,misc]
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                *_: PydanticBaseSettingsSource,
                **__: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (init_settings,)

        Values.__name__ = cls.__name__
        Values.__qualname__ = cls.__qualname__
        found = _VALUES_ONLY[cls] = Values
    return found


def merge(
    base: Mapping[str, Any], top: Mapping[str, Any], maps: Set[str], prefix: str = ""
) -> dict[str, Any]:
    """``top`` over ``base``, sections merged key by key; a setting that is itself a map
    (one of the dotted ``maps``) is replaced whole."""
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        dotted = prefix + key
        if isinstance(value, Mapping) and isinstance(below, Mapping) and dotted not in maps:
            out[key] = merge(below, value, maps, dotted + ".")
        else:
            out[key] = value
    return out


def _dotted(values: Mapping[str, Any], maps: Set[str], prefix: str = "") -> list[str]:
    """The dotted names of the settings in ``values``."""
    out = []
    for key, value in values.items():
        dotted = prefix + key
        if isinstance(value, Mapping) and dotted not in maps:
            out += _dotted(value, maps, dotted + ".")
        else:
            out.append(dotted)
    return out


def env_name(dotted: str) -> str:
    """The ``EDGEFL_`` variable of a dotted setting."""
    return "EDGEFL_" + dotted.upper().replace(".", "__")


def unknown_variables(cls: type[BaseModel], environ: Mapping[str, str]) -> list[str]:
    """``EDGEFL_`` variables that name no setting of ``cls``: an error, as in a file."""
    fields = list(iter_fields(cls))
    known = {env_name(dotted) for dotted, _ in fields}
    sections = {env_name(d.rpartition(".")[0]) for d, _ in fields if "." in d}
    # A map's entries may come one by one: EDGEFL_KEYS__GW_1=...
    maps = tuple(env_name(d) + "__" for d, info in fields if is_structured(info.annotation))
    return sorted(
        name
        for name in environ
        if name.upper().startswith("EDGEFL_")
        and name.upper() not in known | sections | OTHER_VARIABLES
        and not name.upper().startswith(maps)
    )


def describe_error(
    exc: ValidationError, path: Path | None = None, given: Mapping[str, str] | None = None
) -> str:
    """One part per validation error, joined: where (the flag, variable or file), what,
    and the bad value."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown setting"
        value = err.get("input")
        scalar = isinstance(value, (str, int, float, bool))
        shown = f" (got {value!r})" if scalar and repr(value) not in msg else ""
        source = _source(where, given or {})
        if source is not None:
            where = source
        elif path is not None:
            where = f"{path}: {where}"
        parts.append(f"{where}: {msg}{shown}")
    return "; ".join(parts)


def _source(where: str, given: Mapping[str, str]) -> str | None:
    """The flag or variable that set ``where`` or a section above it."""
    while where:
        if where in given:
            return given[where]
        where = where.rpartition(".")[0]
    return None


# ------------------------------------------------------- flags from the fields


def iter_fields(model: type[BaseModel], prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """Yield ``(dotted_name, FieldInfo)`` for every leaf field, nested sections flattened."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from iter_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def is_bool(ann: Any) -> bool:
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    return ann is bool or (_is_union(ann) and args == [bool])


def is_structured(ann: Any) -> bool:
    """list/dict fields take JSON on the command line."""
    origin = typing.get_origin(ann)
    if _is_union(ann):
        return any(is_structured(a) for a in typing.get_args(ann) if a is not type(None))
    return origin in (list, dict) or ann in (list, dict)


def _is_union(ann: Any) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType)


def parse_flag_value(ann: Any, raw: str) -> Any:
    if is_structured(ann):
        try:
            return json.loads(raw)
        except ValueError:
            raise ConfigError(f"expected JSON, got {raw!r}") from None
    return raw


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"mqtt.broker": x}`` -> ``{"mqtt": {"broker": x}}``."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
