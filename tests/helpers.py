"""Helpers for tests that drive the real CLI in a subprocess (on real engines, or on the fake one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO / "cache" / "models"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def report(self) -> dict:
        """The run's saved form (``run`` of the folder's parity.json)."""
        return json.loads((self.run_dir / "parity.json").read_text())["run"]


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 900,
            module: str = "vllm_rbln_exec") -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_cache_dir(root: Path) -> Path:
    """A fresh reference cache whose models/ is the shared folder (conversion happens once)."""
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    SHARED_MODELS.mkdir(parents=True, exist_ok=True)
    link = cache / "models"
    if not link.exists():
        link.symlink_to(SHARED_MODELS, target_is_directory=True)
    return cache


def capture_job(model: Path, folder: Path, engine: str, prompts: list[str], *, max_tokens: int, batch: int,
                env: dict, capture: str = "fast", store: str = "fp32", logprobs: int = -1,
                force: list[list[int]] | None = None, label: str = "target", timeout: float = 900,
                max_model_len: int = 256, engine_args: dict | None = None):
    """A worker job capturing ``prompts`` on the CPU with ``engine``, built through the same typed records as a run."""
    from vllm_rbln_exec.setup.options import Parallel
    from vllm_rbln_exec.setup.request import CaptureRequest, capture_task
    from vllm_rbln_exec.setup.sides import Side
    from vllm_rbln_exec.worker.spawn import WorkerJob

    side = Side(role="target", device="cpu", platform="cpu", engine=engine, dtype="float32", checkpoint=str(model),
                model_name="tiny", torch_device="cpu", parallel=Parallel(), block_size=128,
                engine_args=dict(engine_args or {}),
                profile_engine_args={"enforce_eager": True} if engine == "vllm" else {})
    request = CaptureRequest(
        side=side, prompts=tuple(prompts), max_tokens=max_tokens, batch=batch, max_model_len=max_model_len,
        logprobs=logprobs, capture=capture, store=store,
        settings={"dtype": "float32", "max_tokens": max_tokens, "logprobs": logprobs, "capture": capture,
                  "store": store},
        force=tuple(tuple(t) for t in force) if force is not None else None,
    )
    return WorkerJob(task=capture_task(label, folder, request), env=env, timeout=timeout)


def processes_mentioning(path: Path) -> list[str]:
    """Command lines of running processes that name ``path`` (workers and their children name their folder)."""
    # -ww: without it ps cuts lines at $COLUMNS (80 under pytest), cutting off the path
    out = subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if str(path) in line and "ps -ww" not in line and line.split()[1:2] != ["Z"]]


# -- the fake engine (tests/fakes) -----------------------------------------------------------------
FAKE_ENTRY = "fake=tests.fakes.engine:FakeEngine"
# the real CLI: the fake engine is registered through $VLLM_RBLN_EXEC_ENGINES
FAKE_CLI = "vllm_rbln_exec"
FAKE_SWITCHES = ("SIDES", "SHIFT", "CRASH", "HANG", "HANG_S", "PLATFORM", "DELAY", "CHILD")
FAKE_MAX_TOKENS = 6
FAKE_PROMPTS = 2


def fake_env(**switches: str) -> dict[str, str]:
    """The environment of a CLI run on the fake engine: registered, importable by the workers,
    with the given ``VRE_FAKE_*`` switches (``shift="1@0:2"`` -> ``VRE_FAKE_SHIFT``) and no stray ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRE_FAKE_")}
    env.update({f"VRE_FAKE_{name}": "" for name in FAKE_SWITCHES})  # empty: off, also over the caller's environment
    env["VLLM_RBLN_EXEC_ENGINES"] = FAKE_ENTRY
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "200"
    for name, value in switches.items():
        if name.upper() not in FAKE_SWITCHES:
            raise KeyError(f"the fake engine has no switch {name!r}")
        env[f"VRE_FAKE_{name.upper()}"] = str(value)
    return env


def fake_args(model: Path) -> list[str]:
    return ["--model", str(model), "--target", "cpu", "--reference-engine", "fake", "--target-engine", "fake",
            "--max-tokens", str(FAKE_MAX_TOKENS), "--num-prompts", str(FAKE_PROMPTS)]


# -- the fake vLLM platform plugin (tests/vre_fake_plugin) --------------------------------------------
FAKE_PLUGIN = REPO / "tests" / "vre_fake_plugin"
FAKE_PLUGIN_DEVICES = FAKE_PLUGIN / "devices.toml"


def install_fake_plugin(folder: Path, entry_point: str = "vre_fake", dist: str = "vre_fake_plugin",
                        version: str = "0.1.0") -> Path:
    """A folder that makes the fake plugin discoverable when it is on PYTHONPATH, and only then.

    The package is copied beside ``<dist>-<version>.dist-info`` (METADATA and an ``entry_points.txt``
    declaring ``entry_point`` in ``vllm.platform_plugins``): importlib.metadata reads distributions from
    every folder on sys.path, as it reads a site-packages folder. Returns the folder for PYTHONPATH."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(FAKE_PLUGIN, folder / FAKE_PLUGIN.name, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.toml"))
    info = folder / f"{dist}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        f"[vllm.platform_plugins]\n{entry_point} = {FAKE_PLUGIN.name}:register\n")
    (info / "top_level.txt").write_text(f"{FAKE_PLUGIN.name}\n")
    return folder
