"""Tests of device profiles: the shipped YAML files, the loader's validation and round trips."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetsearch.errors import ProfileError
from budgetsearch.profiles import (
    PROFILES_ENV_VAR,
    DeviceProfile,
    MeasuredRate,
    format_profile_table,
    list_profiles,
    load_profile,
    profile_from_dict,
    profile_summary_rows,
    profile_to_dict,
    save_profile,
)

SHIPPED = [
    "jetson-nano",
    "jetson-orin-nano",
    "nrf52840",
    "rpi-zero-2w",
    "rpi4",
    "stm32f746",
    "stm32h743",
]
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
BASE = "stm32h743"


def raw(name: str = BASE) -> dict[str, Any]:
    """The parsed YAML of a shipped profile, as written."""
    return yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


def write(tmp_path: Path, data: Any, name: str = BASE) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def load_error(tmp_path: Path, data: Any) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    return message


def numeric_paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every number in a profile mapping (an independent walk of the YAML)."""
    out = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key == "sources" and not prefix:
            continue
        if isinstance(value, dict):
            out += numeric_paths(value, path + ".")
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, str) and value[:1].isdigit()
        ):
            out.append(path)
    return [p for p in out if p != "schema_version"]


def test_every_shipped_profile_is_registered() -> None:
    assert set(SHIPPED) <= set(list_profiles())
    assert {p.stem for p in PROFILES_DIR.glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize("name", list_profiles())
def test_profile_loads_and_names_match(name: str) -> None:
    profile = load_profile(name)
    assert isinstance(profile, DeviceProfile)
    assert profile.name == name
    assert profile.path is not None and profile.path.stem == name
    assert profile.memory_bytes > 0 and profile.peak_macs_per_s > 0
    assert profile.display_name.strip()


@pytest.mark.parametrize("name", list_profiles())
def test_profile_round_trips(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)
    assert profile_from_dict(profile_to_dict(profile)) == profile
    written = save_profile(profile, tmp_path / f"{name}.yaml")
    again = load_profile(written)
    assert again == profile
    assert again.path == written
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.yaml"]  # no temporary left over


@pytest.mark.parametrize("name", list_profiles())
def test_sources_cover_every_numeric_field(name: str) -> None:
    data = raw(name) if name in SHIPPED else profile_to_dict(load_profile(name))
    sources = data["sources"]
    paths = numeric_paths(data)
    assert "compute.peak_macs_per_s" in paths and "memory.training_bytes" in paths
    for path in paths:
        parts = path.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        assert prefixes & set(sources), f"{name}: {path} has no source"
    assert all(isinstance(text, str) and len(text) > 10 for text in sources.values())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_conventions(name: str) -> None:
    p = load_profile(name)
    if p.kind == "mcu":
        assert (p.frozen_weights_in, p.weight_bytes, p.activation_bytes, p.bias_bytes) == (
            "flash",
            1,
            1,
            4,
        )
        assert (p.default_batch_size, p.default_optimizer, p.in_place_update) == (1, "sgd", True)
        assert p.flash_bytes is not None and p.memory_bytes < 1024**2
    else:
        assert p.frozen_weights_in == "ram" and p.flash_bytes is None
        assert p.weight_bytes == p.gradient_bytes == 4
        assert p.default_optimizer == "momentum" and 8 <= p.default_batch_size <= 32


def test_known_numbers() -> None:
    assert load_profile("stm32f746").memory_bytes == 256 * 1024
    assert load_profile("stm32h743").peak_macs_per_s == pytest.approx(2.4e8)
    assert load_profile("stm32h743").flash_bytes == 2 * 1024**2
    assert load_profile("rpi4").memory_bytes == 2 * 1024**3


def test_profile_is_frozen_and_hashable() -> None:
    p = load_profile(BASE)
    with pytest.raises(AttributeError):
        p.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.sources["x"] = "y"  # type: ignore[index]
    assert hash(p) == hash(load_profile(BASE))


def test_measured_rates_are_parsed() -> None:
    data = raw()
    data["measured"] = {"conv": {"forward_macs_per_s": 1e8, "backward_macs_per_s": 5e7}}
    data["sources"]["measured"] = "a bench run"
    p = profile_from_dict(data)
    assert p.measured["conv"] == MeasuredRate(1e8, 5e7)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("stm32f999")
    message = str(info.value)
    assert "stm32f999" in message
    for name in SHIPPED:
        assert name in message


def test_missing_file_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such device profile file"):
        load_profile(tmp_path / "nothing.yaml")


def test_missing_field(tmp_path: Path) -> None:
    data = raw()
    del data["memory"]["training_bytes"]
    message = load_error(tmp_path, data)
    assert "memory.training_bytes" in message and "missing" in message and "bytes" in message


def test_missing_section(tmp_path: Path) -> None:
    data = raw()
    del data["compute"]
    message = load_error(tmp_path, data)
    assert "compute: missing" in message and "peak_macs_per_s" in message


def test_wrong_type(tmp_path: Path) -> None:
    data = raw()
    data["compute"]["peak_macs_per_s"] = "fast"
    message = load_error(tmp_path, data)
    assert "compute.peak_macs_per_s" in message and "MAC/s" in message and "'fast'" in message


def test_wrong_type_bool_is_not_a_number(tmp_path: Path) -> None:
    data = raw()
    data["training"]["default_batch_size"] = True
    message = load_error(tmp_path, data)
    assert "training.default_batch_size" in message and "positive integer" in message


def test_unknown_key(tmp_path: Path) -> None:
    data = raw()
    data["memory"]["sram_bytes"] = "1MB"
    message = load_error(tmp_path, data)
    assert "memory.sram_bytes" in message and "unknown key" in message
    assert "training_bytes" in message  # the allowed keys


def test_unknown_top_level_key(tmp_path: Path) -> None:
    data = raw()
    data["power_watts"] = 3
    message = load_error(tmp_path, data)
    assert "power_watts: unknown key" in message


def test_bad_enum(tmp_path: Path) -> None:
    data = raw()
    data["kind"] = "phone"
    message = load_error(tmp_path, data)
    assert "kind" in message and "'phone'" in message
    assert all(repr(k) in message for k in ("mcu", "sbc", "gpu", "host"))


def test_bad_dtype_size(tmp_path: Path) -> None:
    data = raw()
    data["dtypes"]["gradient"] = 3
    message = load_error(tmp_path, data)
    assert (
        "dtypes.gradient" in message
        and "bytes per element" in message
        and "{1, 2, 4, 8}" in message
    )


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("compute", "op_overhead_us", -1.0),
        ("compute", "memory_bandwidth_bytes_per_s", 0),
        ("training", "default_batch_size", 0),
        ("memory", "training_bytes", -5),
        ("memory", "training_bytes", "0KB"),
    ],
)
def test_negative_or_zero_number(tmp_path: Path, section: str, key: str, value: Any) -> None:
    data = raw()
    data[section][key] = value
    message = load_error(tmp_path, data)
    assert f"{section}.{key}" in message and "positive" in message


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("training", "default_batch_size", 10**30, "a positive integer of at most 65,536"),
        ("memory", "training_bytes", "2048GB", "at most 1,099,511,627,776 bytes"),
    ],
)
def test_a_size_past_the_command_lines_bounds(tmp_path: Path, section: str, key: str,
                                               value: Any, expected: str) -> None:
    """A typo of a hand edit (a batch of 10**30 overflowed the cost model) is a named error."""
    data = raw()
    data[section][key] = value
    message = load_error(tmp_path, data)
    assert f"{section}.{key}" in message and expected in message


def test_the_profile_bounds_are_the_command_lines() -> None:
    from budgetsearch import _profile_schema as schema
    from budgetsearch.cli import _common as cli

    assert schema.MAX_BATCH_SIZE == cli.MAX_BATCH_SIZE
    assert schema.MAX_MEMORY_BYTES == cli.MAX_BUDGET_BYTES


def test_malformed_yaml(tmp_path: Path) -> None:
    text = (PROFILES_DIR / f"{BASE}.yaml").read_text(encoding="utf-8")
    text = text.replace("  training_bytes: 960KB", "  training_bytes: [960KB", 1)
    path = tmp_path / f"{BASE}.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message and "malformed YAML" in message and "line" in message
    assert "memory.training_bytes" in message


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    message = load_error(tmp_path, ["not", "a", "mapping"])
    assert "mapping" in message


def test_numeric_field_without_source(tmp_path: Path) -> None:
    data = raw()
    del data["sources"]["compute.peak_macs_per_s"]
    message = load_error(tmp_path, data)
    assert "compute.peak_macs_per_s" in message and "source" in message


def test_section_source_covers_its_fields() -> None:
    data = raw()
    for key in [k for k in data["sources"] if k.startswith("dtypes.")]:
        del data["sources"][key]
    data["sources"]["dtypes"] = "int8 engine, see notes"
    assert profile_from_dict(data).weight_bytes == 1


def test_source_key_naming_no_field(tmp_path: Path) -> None:
    data = raw()
    data["sources"]["compute.peak_flops"] = "typo"
    message = load_error(tmp_path, data)
    assert "sources.compute.peak_flops" in message and "names no profile field" in message


def test_name_must_match_file_stem(tmp_path: Path) -> None:
    data = raw()
    data["name"] = "other"
    message = load_error(tmp_path, data)
    assert "name" in message and "'other'" in message


def test_flash_weights_need_flash(tmp_path: Path) -> None:
    data = raw()
    data["memory"]["flash_bytes"] = None
    message = load_error(tmp_path, data)
    assert "memory.flash_bytes" in message and "flash" in message


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    data = raw()
    data["kind"] = "phone"
    data["dtypes"]["weight"] = "int8"
    message = load_error(tmp_path, data)
    assert "2 problems" in message and "kind" in message and "dtypes.weight" in message


def test_numbers_written_like_1e9_are_accepted() -> None:
    data = raw()
    data["compute"]["peak_macs_per_s"] = "2.4e8"  # what yaml.safe_load makes of 2.4e8
    assert profile_from_dict(data).peak_macs_per_s == pytest.approx(2.4e8)


def test_sizes_accept_ints_and_strings() -> None:
    data = raw()
    data["memory"]["training_bytes"] = 4096
    data["memory"]["flash_bytes"] = "1.5MB"
    p = profile_from_dict(data)
    assert (p.memory_bytes, p.flash_bytes) == (4096, 1536 * 1024)


def test_save_rejects_mismatched_stem(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="named after its profile"):
        save_profile(load_profile(BASE), tmp_path / "renamed.yaml")


def test_env_var_adds_profile_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = raw()
    data["name"] = "my-board"
    write(tmp_path, data, name="my-board")
    monkeypatch.setenv(PROFILES_ENV_VAR, str(tmp_path))
    assert "my-board" in list_profiles()
    assert load_profile("my-board").memory_bytes == load_profile(BASE).memory_bytes


def test_summary_rows_and_table() -> None:
    rows = profile_summary_rows()
    assert {r["name"] for r in rows} >= set(SHIPPED)
    assert rows[0]["kind"] == "mcu"
    keys = {"name", "kind", "training_memory_bytes", "frozen_weights_in", "peak_macs_per_s"}
    assert keys | {"memory_bandwidth_bytes_per_s", "batch_size", "optimizer"} <= set(rows[0])
    table = format_profile_table(rows)
    lines = table.splitlines()
    assert len(lines) == len(rows) + 2 and lines[0].startswith("name")
    assert "256.0 KB" in table and "240 MMAC/s" in table


# --- property-based: a mutated profile either validates or raises ProfileError -----------------

_WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e400KB", "nan", "256KB", "-1MB", "1e9", "mcu", "flash", "momentum", ""]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _containers(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path] if isinstance(data, dict) else []
    if isinstance(data, dict):
        for key, value in data.items():
            out += _containers(value, (*path, key))
    return out


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(SHIPPED),
    mutations=st.lists(
        st.tuples(st.sampled_from(["delete", "replace", "add"]), st.integers(0, 10**6), _WRONG),
        min_size=1,
        max_size=3,
    ),
    new_key=st.one_of(st.text(max_size=8), st.integers(), st.sampled_from(["measured", "notes"])),
)
def test_mutated_profiles_raise_only_profile_errors(
    name: str, mutations: list[tuple[str, int, Any]], new_key: Any
) -> None:
    data = copy.deepcopy(raw(name))
    for action, pick, value in mutations:
        containers = _containers(data)
        if not containers:
            break
        target = _get(data, containers[pick % len(containers)])
        keys = list(target)
        if action == "add" or not keys:
            target[new_key] = value
        elif action == "delete":
            del target[keys[pick % len(keys)]]
        else:
            target[keys[pick % len(keys)]] = value
    try:
        profile = profile_from_dict(data, source="<mutated>")
    except ProfileError as exc:
        assert str(exc).startswith("<mutated>: ")
    else:
        assert isinstance(profile, DeviceProfile)
        assert profile_from_dict(profile_to_dict(profile)) == profile


@settings(max_examples=200, deadline=None)
@given(st.recursive(_WRONG, lambda inner: st.dictionaries(st.text(max_size=10), inner, max_size=4)))
def test_arbitrary_data_raises_only_profile_errors(data: Any) -> None:
    with pytest.raises(ProfileError):
        profile_from_dict(data)
