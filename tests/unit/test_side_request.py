"""What each side's worker is asked to check: the platform it must report (no worker starts here).

The worker compares its engine's platform with the side's ``platform`` (exit 3 on a
mismatch, tested end to end on the fake engine in tests/plumbing). A vLLM side
must report its device profile's vLLM platform; a torch-driven engine the type of
the torch device it was given.
"""

from __future__ import annotations

import pytest

from vllm_rbln_exec.setup.devices import load_profiles
from vllm_rbln_exec.setup.options import build_options
from vllm_rbln_exec.setup.sides import resolve_side


@pytest.fixture
def devices(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text('[device.fakeaccel]\nplatform = "rbln"\ntorch_device = "fakeaccel:1"\n'
                    'description = "claims rbln"\n[device.fakeaccel.engine]\nblock_size = 128\n')
    return path


@pytest.mark.parametrize("engine, expected", [("vllm", "rbln"), ("transformers", "fakeaccel")])
def test_expected_platform_of_the_target(tmp_path, devices, engine, expected):
    options = build_options(target="fakeaccel", devices_file=str(devices), target_engine=engine)
    profiles = load_profiles(str(devices))
    target = resolve_side(options.target, profiles["fakeaccel"], options.capture, str(tmp_path / "m"), "m",
                          options.parallel)
    assert (target.device, target.engine, target.platform) == ("fakeaccel", engine, expected)
    assert target.torch_device == "fakeaccel:1" and target.block_size == 128
    reference = resolve_side(options.reference, profiles["cpu"], options.capture, str(tmp_path / "m"), "m")
    assert (reference.platform, reference.device, reference.block_size) == ("cpu", "cpu", 128)


def test_reference_device_names_a_profile_and_a_torch_device(tmp_path, devices):
    options = build_options(reference_device="fakeaccel:3", devices_file=str(devices), reference_engine="transformers")
    profiles = load_profiles(str(devices))
    reference = resolve_side(options.reference, profiles[options.reference.device], options.capture, "m", "m")
    assert (reference.device, reference.torch_device, reference.platform) == ("fakeaccel", "fakeaccel:3", "fakeaccel")


@pytest.mark.parametrize("engine, expected", [("vllm", {"gpu_memory_utilization": 0.85}), ("transformers", {})])
def test_profile_engine_defaults_are_for_vllm_sides_only(engine, expected):
    """The cuda profile's gpu_memory_utilization is a vLLM engine argument: a transformers side never uses it, so
    its report, the differences between the sides and its cache key must not list it (seen on an H200 run)."""
    options = build_options(target="cuda", target_engine=engine)
    target = resolve_side(options.target, load_profiles(None)["cuda"], options.capture, "m", "m", options.parallel)
    assert target.effective_engine_args() == expected
