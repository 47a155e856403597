"""Configuration loading: a TOML file, then the environment, then explicit overrides.

Precedence, later wins: struct defaults < TOML file < environment < ``overrides``. Tables
merge key by key, so an environment variable replaces one leaf, not its whole table.

Environment rule. A variable ``{env_prefix}A__B__C`` sets the key path ``a.b.c``: a double
underscore separates nesting levels and names are lower-cased. The variable is considered
only when ``a`` is a top-level field of the config struct; other variables sharing the
prefix (``MEMSERVE_CACHE_DIR`` read by some other component) are none of this config's
business and are ignored. Once considered, the variable must name a real key: an unknown
sub-key is an error naming the variable, never a silent no-op.

Environment values. When the target key is typed ``str`` (or ``str | None``) the text is
used verbatim, so ``MEMSERVE_MODEL__REVISION=0123`` stays a string. Otherwise the text is
parsed as a TOML value (``32``, ``true``, ``0.5``, ``[1, 2]``, ``{ a = 1 }``, ``"x"``) and
falls back to the plain string when it is not one; validation then reports a string where
the key wanted something else.

Every failure is a ``ConfigError`` whose message names where the bad value came from (the
file, the environment variable, the override key) and the dotted key path, e.g.
``config error in deploy/local.toml: engine.blok_size: unknown key``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from common.security import ClusterKeyConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

T = TypeVar("T", bound=msgspec.Struct)

KeyPath = tuple[str, ...]


class ConfigError(ValueError):
    """Invalid configuration; ``source`` and ``key`` say where, when known."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        prefix = f"config error in {source}" if source else "config error"
        super().__init__(f"{prefix}: {key}: {message}" if key else f"{prefix}: {message}")
        self.source = source
        self.key = key


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    env_prefix: str = "MEMSERVE_",
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build a ``cls`` from the TOML file at ``path``, the environment and ``overrides``.

    ``env`` defaults to ``os.environ``. ``overrides`` maps dotted key paths
    (``"engine.block_size"``) to already-typed values.
    """
    if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
        raise TypeError(f"load_config needs a msgspec.Struct type, got {cls!r}")
    file_source = os.fspath(path) if path is not None else None
    data: dict[str, Any] = _read_toml(file_source) if file_source is not None else {}
    sources: dict[KeyPath, str] = {}

    for var, text in sorted((os.environ if env is None else env).items()):
        keys = _env_keys(cls, var, env_prefix)
        if keys is None:
            continue
        source = f"environment variable {var}"
        value = text if _wants_str(cls, keys) else _parse_toml_value(text)
        _set(data, keys, value, source)
        sources[keys] = source

    for dotted, value in (overrides or {}).items():
        keys = tuple(dotted.split("."))
        source = f"override {dotted!r}"
        if not all(keys):
            raise ConfigError("empty key component", source=source)
        _set(data, keys, value, source)
        sources[keys] = source

    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as e:
        raise _config_error(str(e), sources, file_source) from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("file not found", source=path) from None
    except OSError as e:
        raise ConfigError(f"cannot read file: {e.strerror or e}", source=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", source=path) from None


def _env_keys(cls: type[msgspec.Struct], var: str, prefix: str) -> KeyPath | None:
    """The key path ``var`` sets, or None when the variable is not for this config."""
    if not var.startswith(prefix):
        return None
    keys = tuple(var[len(prefix) :].lower().split("__"))
    top_level = {f.encode_name for f in msgspec.structs.fields(cls)}
    if keys[0] not in top_level:
        return None
    if not all(keys):
        raise ConfigError(
            "empty key component (use exactly two underscores between levels)",
            source=f"environment variable {var}",
        )
    return keys


def _parse_toml_value(text: str) -> Any:
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    # Text with a newline can smuggle in more keys; such text is not one value.
    return parsed["v"] if len(parsed) == 1 else text


def _wants_str(cls: type[msgspec.Struct], keys: KeyPath) -> bool:
    """Whether the key at ``keys`` is typed as a string (possibly optional)."""
    info: msgspec.inspect.Type = msgspec.inspect.type_info(cls)
    for key in keys:
        info = _unwrap_optional(info)
        if isinstance(info, msgspec.inspect.StructType):
            fields = {f.encode_name: f.type for f in info.fields}
            if key not in fields:
                return False
            info = fields[key]
        elif isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        else:
            return False
    return isinstance(_unwrap_optional(info), msgspec.inspect.StrType)


def _unwrap_optional(info: msgspec.inspect.Type) -> msgspec.inspect.Type:
    if isinstance(info, msgspec.inspect.UnionType):
        members = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(members) == 1:
            return members[0]
    return info


def _set(data: dict[str, Any], keys: KeyPath, value: Any, source: str) -> None:
    table = data
    for depth, key in enumerate(keys[:-1]):
        child = table.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"cannot set a sub-key of {'.'.join(keys[: depth + 1])}, which is not a table",
                source=source,
                key=".".join(keys),
            )
        table = child
    table[keys[-1]] = value


_AT = re.compile(r"^(?P<detail>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED_FIELD = re.compile(r"^Object (?P<what>contains unknown|missing required) field `(?P<f>.+)`$")
_TOKEN = re.compile(r"\.([^.\[]+)|\[([^\]]*)\]")


def _config_error(
    message: str, sources: Mapping[KeyPath, str], file_source: str | None
) -> ConfigError:
    """Turn msgspec's ``detail - at `$.a.b``` into a ConfigError with a source and key."""
    match = _AT.match(message)
    assert match is not None  # the pattern matches any string
    detail, raw_path = match["detail"], match["path"] or ""
    tokens = [m[1] if m[1] is not None else f"[{m[2]}]" for m in _TOKEN.finditer(raw_path)]
    named = _NAMED_FIELD.match(detail)
    if named:
        tokens.append(named["f"])
        detail = "unknown key" if named["what"] == "contains unknown" else "missing required key"
    key = ""
    for token in tokens:
        key += token if token.startswith("[") else (f".{token}" if key else token)
    source = _source_of(tokens, sources) or file_source
    return ConfigError(detail, source=source, key=key or None)


def _source_of(tokens: list[str], sources: Mapping[KeyPath, str]) -> str | None:
    """The source that set the error's key path or the longest prefix of it; failing that,
    one that set a key below it (a sub-key under a scalar fails at the scalar).

    msgspec renders dict keys as ``[...]``, which matches any key.
    """

    def covers(keys: Sequence[str], path: Sequence[str]) -> bool:
        return len(keys) <= len(path) and all(
            token in (key, "[...]") for key, token in zip(keys, path[: len(keys)], strict=True)
        )

    above = [(len(keys), source) for keys, source in sources.items() if covers(keys, tokens)]
    if above:
        return max(above, key=lambda c: c[0])[1]
    below = [source for keys, source in sources.items() if covers(tokens, keys)]
    return below[0] if below else None


class SharedFile(msgspec.Struct, forbid_unknown_fields=True):
    """Root of a config file that several services share (deploy/procfile.toml): each
    service's Settings subclasses it and types its own table; the other services' tables
    are accepted and left alone, a misspelled table name is still an error."""

    # The cluster key's source; the rest of the table is `memserve up`'s.
    cluster: ClusterKeyConfig = msgspec.field(default_factory=ClusterKeyConfig)
    scheduler: dict[str, Any] = msgspec.field(default_factory=dict)
    gateway: dict[str, Any] = msgspec.field(default_factory=dict)
    worker: dict[str, Any] = msgspec.field(default_factory=dict)
    mempool: dict[str, Any] = msgspec.field(default_factory=dict)
    api: dict[str, Any] = msgspec.field(default_factory=dict)
