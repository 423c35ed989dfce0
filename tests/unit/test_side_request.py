"""What each side's worker is asked to check: the platform it must report (no worker starts here).

The worker compares its engine's platform with ``expected_platform`` (exit 3 on a
mismatch, tested end to end on the fake engine in tests/plumbing). A vLLM side
must report its device profile's vLLM platform; a torch-driven engine the type of
the torch device it was given.
"""

from __future__ import annotations

import pytest

from vllm_rbln_exec.pipeline.run import ParityRun
from vllm_rbln_exec.setup.options import RunConfig


@pytest.fixture
def devices(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text('[device.fakeaccel]\nplatform = "rbln"\ntorch_device = "fakeaccel:1"\n'
                    'description = "claims rbln"\n[device.fakeaccel.engine]\nblock_size = 128\n')
    return path


@pytest.mark.parametrize("engine, expected", [("vllm", "rbln"), ("transformers", "fakeaccel")])
def test_expected_platform_of_the_target(tmp_path, devices, engine, expected):
    cfg = RunConfig(target="fakeaccel", devices_file=str(devices), target_engine=engine,
                    cache_dir=str(tmp_path / "cache"))
    run = ParityRun(cfg)
    reference, target = run.resolve_devices()
    request = run.side_request("target", target, tmp_path / "model", ["a prompt"])
    assert (request["device"], request["engine"], request["expected_platform"]) == ("fakeaccel", engine, expected)
    assert request["torch_device"] == "fakeaccel:1"
    ref_request = run.side_request("reference", reference, tmp_path / "model", ["a prompt"])
    assert ref_request["expected_platform"] == "cpu" and ref_request["device"] == "cpu"
