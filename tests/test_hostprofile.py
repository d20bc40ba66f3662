"""Tests of the host measurement: real (quick) timings that give a valid, loadable profile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from budgetsearch.errors import ProfileError
from budgetsearch.hostprofile import cpu_model, measure_host, total_ram_bytes
from budgetsearch.profiles import OP_CLASSES, DeviceProfile, load_profile, save_profile


@pytest.fixture(scope="module")
def host() -> DeviceProfile:
    return measure_host(name="test-host", quick=True, progress=False)


def test_rates_are_positive(host: DeviceProfile) -> None:
    assert host.kind == "host"
    assert set(host.measured) == set(OP_CLASSES)
    for rate in host.measured.values():
        assert rate.forward_macs_per_s > 0 and rate.backward_macs_per_s > 0
    assert host.peak_macs_per_s >= max(r.forward_macs_per_s for r in host.measured.values()) * 0.99
    assert host.memory_bandwidth_bytes_per_s > 0 and host.op_overhead_us > 0


def test_host_profile_conventions(host: DeviceProfile) -> None:
    assert host.frozen_weights_in == "ram" and host.flash_bytes is None
    sizes = (host.weight_bytes, host.bias_bytes, host.activation_bytes, host.gradient_bytes)
    assert sizes == (4, 4, 4, 4)
    assert 0 < host.memory_bytes <= total_ram_bytes()


def test_sources_record_the_measurement(host: DeviceProfile) -> None:
    text = host.sources["measured"]
    assert "measured by budgetsearch profile-host on" in text
    assert f"torch {torch.__version__}" in text and cpu_model() in text
    assert "compute.peak_macs_per_s" in host.sources


def test_saves_and_reloads(host: DeviceProfile, tmp_path: Path) -> None:
    path = save_profile(host, tmp_path / "test-host.yaml")
    again = load_profile(path)
    assert again == host
    assert again.measured["conv"].forward_macs_per_s == host.measured["conv"].forward_macs_per_s


def test_bad_repeats_is_a_profile_error() -> None:
    with pytest.raises(ProfileError, match="repeats"):
        measure_host(repeats=0, quick=True, progress=False)


def test_bad_name_is_a_profile_error() -> None:
    with pytest.raises(ProfileError, match="name"):
        measure_host(name="bad name/with slash", quick=True, repeats=1, progress=False)


def test_machine_facts() -> None:
    assert total_ram_bytes() > 0
    assert cpu_model().strip()
