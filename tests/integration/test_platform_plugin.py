"""The plugin path without the hardware: a real out-of-tree vLLM platform plugin, loaded by a real vLLM.

The plugin is tests/vre_fake_plugin: vLLM's CPU platform under a name of its own, with a switch that makes
its logits wrong from a chosen generated position on. It is never installed: ``install_fake_plugin`` lays
it out beside a ``*.dist-info`` folder (entry point in ``vllm.platform_plugins``) and only these CLI runs get
that folder on PYTHONPATH, so no other test (they all may use ``--target auto``) ever sees it. Two layouts:
under its own entry-point name (``vre_fake``), and under the RBLN plugin's (``rbln`` in a distribution named
``vllm_rbln``, as vllm-rbln's pyproject declares it).

Three CLI runs, four engine starts (the reference is computed once and taken from the cache after):

* ``--target auto`` with the plugin installed as ``rbln``: auto picks the rbln profile, whose environment
  reaches the target (seen from inside it, by the plugin), the reference stays on vLLM's CPU platform
  although the caller's environment carries what would let a plugin in, and identical numbers pass.
* ``--target vre_fake`` (a user profile) with the plugin's broken switch: exit 1, the first failing
  position named, and the numbers before it bitwise the reference's.
* a reference profile without the CPU profile's ``VLLM_PLUGINS=cpu`` / ``VLLM_TARGET_DEVICE=cpu``: vLLM
  prefers the plugin's platform to its own CPU platform, and the worker's platform check stops the run
  (exit 3) naming both platforms.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import FAKE_PLUGIN_DEVICES, CliResult, install_fake_plugin, make_cache_dir, run_cli

from vllm_rbln_exec.capture.store import load_capture

pytestmark = pytest.mark.integration

SMALL = ["--num-hidden-layers", "2", "--max-tokens", "4", "--num-prompts", "2", "--use-cache",
         "--devices", str(FAKE_PLUGIN_DEVICES)]
BROKEN_FROM = 1  # VRE_FAKE_PLUGIN_BROKEN: the first generated position the plugin gets wrong
# what a caller's shell may carry (the original tool exported these for its CPU reference): the target
# profiles must scrub them so the plugin can load, the reference profile must set its own
LEFTOVERS = {"VLLM_PLUGINS": "cpu", "VLLM_TARGET_DEVICE": "cpu", "RBLN_DEVICES": "0"}


class PluginWorld:
    """One cache and two plugin layouts shared by this module's runs."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = make_cache_dir(root)
        self.own = install_fake_plugin(root / "site-own")
        self.as_rbln = install_fake_plugin(root / "site-rbln", entry_point="rbln", dist="vllm_rbln",
                                           version="0.0.0+vrefake")

    def run(self, name: str, site: Path, *args: str, **env: str) -> tuple[CliResult, list[dict]]:
        """The CLI with ``site`` on PYTHONPATH; returns its result and the plugin's register() records."""
        log = self.root / f"{name}.plugin.jsonl"
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
        full_env = {"PYTHONPATH": path, "VRE_FAKE_PLUGIN_LOG": str(log), "VRE_FAKE_PLUGIN_BROKEN": "",
                    "COLUMNS": "200", **env}
        run_dir = self.root / name
        proc = run_cli(["--cache-dir", str(self.cache), "--run-dir", str(run_dir), *SMALL, *args],
                       cwd=self.root, env=full_env)
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return CliResult(proc.returncode, proc.stdout, proc.stderr, run_dir), records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return PluginWorld(tmp_path_factory.mktemp("plugin"))


@pytest.fixture(scope="module")
def auto_run(world):
    return world.run("auto", world.as_rbln, "--target", "auto", "--block-size-rbln", "128", **LEFTOVERS)


@pytest.fixture(scope="module")
def broken_run(world):
    return world.run("broken", world.own, "--target", "vre_fake", VRE_FAKE_PLUGIN_BROKEN=str(BROKEN_FROM))


@pytest.fixture(scope="module")
def leaky_run(world):
    return world.run("leaky", world.own, "--target", "vre_fake", "--reference-device", "cpu_leaky")


def _in_cache_of(record: dict, side: str) -> bool:
    return Path(record["env"]["VLLM_CACHE_ROOT"]).parent.name == side


def test_target_auto_picks_the_rbln_plugin_and_only_the_target_loads_it(auto_run):
    result, records = auto_run
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.report
    assert report["resolved"]["decisions"]["target_device"] == "auto -> rbln"
    ref, tgt = report["sides"]["reference"], report["sides"]["target"]

    # the target ran the plugin: vLLM activated it through the entry point named like vllm-rbln's
    assert tgt["device"] == "rbln" and tgt["platform"] == "rbln"
    platform = tgt["effective"]["platform"]
    assert platform["class"] == "vre_fake_plugin.platform.VreFakePlatform"
    assert platform["plugin"]["entry_point"] == "rbln" and platform["plugin"]["distribution"] == "vllm_rbln"
    assert platform["device_type"] == "cpu"  # as vllm-rbln's own platform: the device type cannot tell
    # the reference did not: vLLM's CPU platform, and no register() call from any of its processes
    assert ref["platform"] == "cpu" and ref["effective"]["platform"]["plugin"] is None
    assert ref["effective"]["platform"]["class"] == "vllm.platforms.cpu.CpuPlatform"
    assert records and all(_in_cache_of(r, "target-rbln") for r in records), records

    # the rbln profile's environment reached the target (seen from inside, by the plugin), the caller's
    # leftovers that would keep a plugin out did not, and the device selection was kept
    seen = records[0]["env"]
    assert seen["VLLM_RBLN_USE_VLLM_MODEL"] == "1" and seen["RBLN_KERNEL_MODE"] == "triton"
    assert seen["VLLM_DISABLE_COMPILE_CACHE"] == "1" and seen["RBLN_DEVICES"] == "0"
    assert "VLLM_PLUGINS" not in seen and "VLLM_TARGET_DEVICE" not in seen
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert Path(seen[key]).parent.name == "target-rbln"
    # ... and the reference's record shows the CPU profile's own: plugins kept out, RBLN's devices hidden
    assert ref["env"]["set"]["VLLM_PLUGINS"] == "cpu" and ref["env"]["set"]["VLLM_TARGET_DEVICE"] == "cpu"
    assert "RBLN_DEVICES" in ref["env"]["scrubbed"]
    assert {"VLLM_PLUGINS", "VLLM_TARGET_DEVICE"} <= set(tgt["env"]["scrubbed"])

    # the plugin left alone computes what the CPU computes: identical numbers pass
    assert report["summary"]["max_abs_diff"] == 0.0
    assert report["summary"]["distribution"]["kl_max"] == 0.0


def test_the_broken_switch_fails_the_verdict_at_the_plugins_position(broken_run):
    result, records = broken_run
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.report
    tgt = report["sides"]["target"]
    assert tgt["platform"] == "vre_fake" and tgt["effective"]["platform"]["plugin"]["entry_point"] == "vre_fake"
    assert records and all(_in_cache_of(r, "target-vre_fake") for r in records)
    assert records[0]["env"]["VRE_FAKE_PLUGIN_BROKEN"] == str(BROKEN_FROM)

    # every prompt agrees exactly before the plugin's position and leaves the reference's argmax there,
    # for the reference's runner-up, which is what the plugin raised
    ref_capture = load_capture(Path(report["sides"]["reference"]["capture_dir"]))
    tgt_capture = load_capture(Path(tgt["capture_dir"]))
    for comp in report["comparisons"]:
        i = comp["index"]
        div = comp["argmax_divergence"]
        assert div is not None and div["position"] == BROKEN_FROM, comp
        ref_rows, tgt_rows = np.asarray(ref_capture.logprobs(i)), np.asarray(tgt_capture.logprobs(i))
        assert np.array_equal(ref_rows[:BROKEN_FROM], tgt_rows[:BROKEN_FROM])
        assert div["target_token"] == int(np.argsort(ref_rows[BROKEN_FROM])[-2])
    out = " ".join(result.stdout.split())  # the console wraps long lines
    assert out.count(f"first differs at position {BROKEN_FROM}") == len(report["comparisons"])
    assert report["summary"]["kl_prefill"] == 0.0  # position 0 is clean: the finding points at decode
    verdict = json.loads((result.run_dir / "parity.json").read_text())["verdict"]
    assert not verdict["passed"]
    confident = [c["index"] for c in report["comparisons"] if c["argmax_divergence"]["kind"] == "disagreement"]
    named = {(v["prompt_index"], v["position"]) for v in verdict["violations"] if v["metric"] == "argmax"}
    assert confident and all((i, BROKEN_FROM) in named for i in confident), verdict["violations"]
    assert "PARITY FAILS" in out and "the error appears only after position 0" in out


def test_a_reference_that_lets_the_plugin_in_is_stopped_by_the_platform_check(leaky_run):
    result, records = leaky_run
    assert result.returncode == 3, result.stdout + result.stderr
    out = " ".join((result.stdout + result.stderr).split())  # the console wraps long lines
    assert "asked for device 'cpu_leaky' (platform 'cpu') but vllm ran on platform 'vre_fake'" in out
    assert "from the plugin entry point 'vre_fake' of vre_fake_plugin 0.1.0" in out
    # vLLM prefers an installed plugin to its own CPU platform: without the CPU profile's guards the
    # reference worker loaded it, and no target ever started
    assert records and all(_in_cache_of(r, "reference-cpu_leaky") for r in records)
    assert not (result.run_dir / "target").exists()
    # found before the model loaded: the worker never announced an engine start
    events = result.run_dir / "reference" / "events.jsonl"
    assert not events.exists() or "engine_start" not in events.read_text()
