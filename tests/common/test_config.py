"""load_config: file < environment < overrides, and errors that name key and source."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from common.config import ConfigError, load_config


class Engine(msgspec.Struct, forbid_unknown_fields=True):
    block_size: int = 16
    dtype: str = "float16"
    max_batch: int = 8
    gpu_fraction: float = 0.9


class Pool(msgspec.Struct, forbid_unknown_fields=True):
    capacity_gb: float = 1.0
    peers: list[str] = []


class Deploy(msgspec.Struct, forbid_unknown_fields=True):
    log_level: str = "info"
    debug: bool = False
    ports: list[int] = []
    engine: Engine = msgspec.field(default_factory=Engine)
    pools: dict[str, Pool] = {}
    model: str | None = None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "local.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_env() -> None:
    assert load_config(Deploy, env={}) == Deploy()


def test_nested_tables_from_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        log_level = "debug"
        ports = [5555, 5556]
        [engine]
        block_size = 32
        [pools.a]
        capacity_gb = 4.5
        peers = ["tcp://h1:1"]
        """,
    )
    cfg = load_config(Deploy, path, env={})
    assert cfg.log_level == "debug"
    assert cfg.ports == [5555, 5556]
    assert cfg.engine == Engine(block_size=32)
    assert cfg.pools == {"a": Pool(capacity_gb=4.5, peers=["tcp://h1:1"])}


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine]\nblok_size = 32\n")
    with pytest.raises(ConfigError) as info:
        load_config(Deploy, path, env={})
    assert str(info.value) == f"config error in {path}: engine.blok_size: unknown key"
    assert info.value.key == "engine.blok_size"
    assert info.value.source == str(path)


def test_wrong_type_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, '[engine]\nblock_size = "big"\n')
    with pytest.raises(ConfigError, match=r"engine\.block_size: Expected `int`, got `str`"):
        load_config(Deploy, path, env={})


def test_wrong_type_inside_dict_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[pools.a]\ncapacity_gb = "lots"\n')
    with pytest.raises(ConfigError) as info:
        load_config(Deploy, path, env={})
    assert info.value.key == "pools[...].capacity_gb"
    assert info.value.source == str(path)


def test_env_overrides_nested_and_top_level_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine]\nblock_size = 32\nmax_batch = 4\n")
    env = {
        "MEMSERVE_ENGINE__BLOCK_SIZE": "64",
        "MEMSERVE_LOG_LEVEL": "warning",
        "MEMSERVE_DEBUG": "true",
        "MEMSERVE_PORTS": "[1, 2]",
        "MEMSERVE_ENGINE__GPU_FRACTION": "0.5",
    }
    cfg = load_config(Deploy, path, env=env)
    assert cfg.engine == Engine(block_size=64, max_batch=4, gpu_fraction=0.5)
    assert (cfg.log_level, cfg.debug, cfg.ports) == ("warning", True, [1, 2])


def test_env_text_for_string_keys_is_verbatim() -> None:
    env = {"MEMSERVE_MODEL": "0123", "MEMSERVE_ENGINE__DTYPE": "true"}
    cfg = load_config(Deploy, env=env)
    assert cfg.model == "0123"
    assert cfg.engine.dtype == "true"


def test_env_can_create_dict_entries() -> None:
    cfg = load_config(Deploy, env={"MEMSERVE_POOLS__A__CAPACITY_GB": "2"})
    assert cfg.pools == {"a": Pool(capacity_gb=2.0)}


def test_unrelated_prefixed_variables_are_ignored() -> None:
    env = {"MEMSERVE_CACHE_DIR": "/tmp/x", "MEMSERVE_ENGINEX": "1", "OTHER_LOG_LEVEL": "x"}
    assert load_config(Deploy, env=env) == Deploy()


def test_env_unknown_sub_key_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Deploy, env={"MEMSERVE_ENGINE__BLOK_SIZE": "32"})
    assert str(info.value) == (
        "config error in environment variable MEMSERVE_ENGINE__BLOK_SIZE: "
        "engine.blok_size: unknown key"
    )


def test_env_wrong_type_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine]\nblock_size = 32\n")
    with pytest.raises(ConfigError) as info:
        load_config(Deploy, path, env={"MEMSERVE_ENGINE__BLOCK_SIZE": "lots"})
    assert info.value.source == "environment variable MEMSERVE_ENGINE__BLOCK_SIZE"
    assert info.value.key == "engine.block_size"
    assert "Expected `int`, got `str`" in str(info.value)


def test_env_sub_key_of_a_scalar_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Deploy, env={"MEMSERVE_LOG_LEVEL__X": "1"})
    assert info.value.source == "environment variable MEMSERVE_LOG_LEVEL__X"
    assert info.value.key == "log_level"

    with pytest.raises(ConfigError, match=r"MEMSERVE_LOG_LEVEL__X.*not a table"):
        load_config(Deploy, env={"MEMSERVE_LOG_LEVEL": "x", "MEMSERVE_LOG_LEVEL__X": "1"})


def test_env_empty_level_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"MEMSERVE_ENGINE____BLOCK_SIZE.*empty key"):
        load_config(Deploy, env={"MEMSERVE_ENGINE____BLOCK_SIZE": "1"})


def test_custom_env_prefix() -> None:
    env = {"APP_ENGINE__BLOCK_SIZE": "8", "MEMSERVE_ENGINE__BLOCK_SIZE": "99"}
    assert load_config(Deploy, env=env, env_prefix="APP_").engine.block_size == 8


def test_overrides_win_over_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine]\nblock_size = 32\n")
    cfg = load_config(
        Deploy,
        path,
        env={"MEMSERVE_ENGINE__BLOCK_SIZE": "64"},
        overrides={"engine.block_size": 128, "debug": True},
    )
    assert cfg.engine.block_size == 128
    assert cfg.debug is True


def test_bad_override_names_the_override() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Deploy, env={}, overrides={"engine.max_batch": "many"})
    assert info.value.source == "override 'engine.max_batch'"
    assert info.value.key == "engine.max_batch"


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[engine\nblock_size = 32\n")
    with pytest.raises(ConfigError, match=f"config error in {re.escape(str(path))}: invalid TOML"):
        load_config(Deploy, path, env={})


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(
        ConfigError, match=f"config error in {re.escape(str(path))}: file not found"
    ):
        load_config(Deploy, path, env={})


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    class Needs(msgspec.Struct, forbid_unknown_fields=True):
        engine: Engine
        name: str

    path = write(tmp_path, "[engine]\n")
    with pytest.raises(ConfigError) as info:
        load_config(Needs, path, env={})
    assert str(info.value) == f"config error in {path}: name: missing required key"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSERVE_ENGINE__MAX_BATCH", "3")
    assert load_config(Deploy).engine.max_batch == 3


def test_rejects_non_struct_types() -> None:
    with pytest.raises(TypeError, match=r"msgspec\.Struct"):
        load_config(dict, env={})  # type: ignore[type-var]
