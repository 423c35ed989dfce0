"""Device profiles and the worker environment they build.

A profile is data (``data/devices.toml``, merged with an optional user file):
what to set and scrub in a worker's environment, which vLLM platform the worker
must report, which parallelism it accepts and its engine defaults. This module
also picks ``--target auto``. It never imports torch or vLLM: whatever it needs
to know about them it reads from package metadata and files.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from ..core.registry import suggest

OWN_PREFIX = "VLLM_RBLN_EXEC_"
USER_FILE_ENV = "VLLM_RBLN_EXEC_DEVICES"
PARALLEL_KINDS = ("tp", "pp", "dp", "ep")
PLATFORM_PLUGINS = "vllm.platform_plugins"  # the entry-point group vLLM discovers platform plugins in


@dataclass
class DeviceProfile:
    name: str
    platform: str
    description: str = ""
    torch_device: str = "cpu"
    env: dict[str, str] = field(default_factory=dict)
    env_if_known: dict[str, str] = field(default_factory=dict)
    scrub: list[str] = field(default_factory=list)
    cache_env: list[str] = field(default_factory=list)
    parallel: list[str] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)

    def engine_default(self, key: str, default: Any = None) -> Any:
        return self.engine.get(key, default)

    def build_env(
        self,
        base: dict[str, str],
        cache_dir: Path,
        known_vars: frozenset[str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """The worker's environment, and a record of what was set and removed.

        ``known_vars`` is the set of variable names the installed vLLM reads
        (None: vLLM is not installed, so ``env_if_known`` is skipped).
        """
        env = dict(base)
        # the harness's own variables (VLLM_RBLN_EXEC_*) are never a device's to scrub, whatever a pattern says
        removed = sorted(k for k in env if not k.startswith(OWN_PREFIX)
                         and any(fnmatch.fnmatchcase(k, pat) for pat in self.scrub))
        for key in removed:
            del env[key]
        applied: dict[str, str] = {}
        skipped: list[str] = []
        for key, value in self.env.items():
            applied[key] = env[key] = str(value)
        for key, value in self.env_if_known.items():
            if known_vars is not None and key in known_vars:
                applied[key] = env[key] = str(value)
            else:
                skipped.append(key)
        cache_dir = Path(cache_dir)
        for key in self.cache_env:
            sub = cache_dir / key.lower()
            applied[key] = env[key] = str(sub)
        for key, value in (extra or {}).items():
            applied[key] = env[key] = str(value)
        record = {"set": applied, "scrubbed": removed, "skipped_unknown": skipped}
        return env, record

    def check_parallel(self, **sizes: int | bool) -> None:
        for kind, value in sizes.items():
            if kind not in PARALLEL_KINDS:
                continue
            used = bool(value) if isinstance(value, bool) else int(value) > 1
            if used and kind not in self.parallel:
                allowed = ", ".join(f"--{k}" for k in self.parallel) or "none"
                raise UsageError(
                    f"device {self.name!r} does not support --{kind} (allowed: {allowed})",
                    option=f"--{kind}",
                )


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"device file {origin} is not valid TOML: {exc}", option="--devices") from exc


def load_profiles(user_file: str | Path | None = None) -> dict[str, DeviceProfile]:
    shipped = resources.files("vllm_rbln_exec").joinpath("data/devices.toml").read_text()
    tables = _read_toml(shipped, "(shipped)").get("device", {})
    user_file = user_file or os.environ.get(USER_FILE_ENV)
    if user_file:
        path = Path(user_file).expanduser()
        if not path.is_file():
            raise UsageError(f"device file {path} does not exist", option="--devices")
        tables = _merge(tables, _read_toml(path.read_text(), str(path)).get("device", {}))
    profiles = {}
    for name, table in tables.items():
        if "platform" not in table:
            raise UsageError(f"device {name!r} has no 'platform' key", option="--devices")
        unknown = set(table) - (set(DeviceProfile.__dataclass_fields__) - {"name"})
        if unknown:
            raise UsageError(
                f"device {name!r} has unknown keys: {', '.join(sorted(unknown))}", option="--devices"
            )
        bad = set(table.get("parallel", [])) - set(PARALLEL_KINDS)
        if bad:
            raise UsageError(f"device {name!r}: unknown parallel kinds {sorted(bad)}", option="--devices")
        profiles[name] = DeviceProfile(name=name, **table)
    return profiles


def get_profile(name: str, profiles: dict[str, DeviceProfile], option: str = "--target") -> DeviceProfile:
    if name in profiles:
        return profiles[name]
    raise UsageError(suggest("device", name, profiles), option=option)


# -- what is installed / visible, read without importing torch or vLLM --------
def rbln_plugin_installed() -> bool:
    for ep in importlib.metadata.entry_points(group=PLATFORM_PLUGINS):
        if "rbln" in ep.name.lower() or "rbln" in ep.value.lower():
            return True
    return importlib.util.find_spec("vllm_rbln") is not None


def platform_plugin(module: str) -> dict[str, str | None] | None:
    """The ``vllm.platform_plugins`` entry point whose package holds ``module`` (a platform class's module).

    None when no entry point, or more than one, comes from that top-level package."""
    top = module.split(".")[0]
    found = [ep for ep in importlib.metadata.entry_points(group=PLATFORM_PLUGINS) if ep.module.split(".")[0] == top]
    if len(found) != 1:
        return None
    ep = found[0]
    dist = getattr(ep, "dist", None)
    return {"entry_point": ep.name, "value": ep.value, "distribution": dist.name if dist else None,
            "version": dist.version if dist else None}


def platform_identity(module: str, device_type: str) -> tuple[str, dict[str, str | None] | None]:
    """The name a worker reports for the platform vLLM activated (what a profile's ``platform`` must say),
    and the plugin it came from (None for vLLM's own platforms).

    vLLM's own platforms are named by their device type (cpu, cuda, ...). A plugin's platform is named by
    its entry point (rbln): its device type says nothing about which plugin is active, since vllm-rbln's
    RblnPlatform reports device_type "cpu" unless VLLM_RBLN_USE_DEVICE_TENSOR is on (vllm-rbln v0.11.0,
    vllm_rbln/platform.py), and a reference that loaded it would otherwise pass for the CPU. A plugin class
    that no single entry point explains is named by its top-level package, never by a built-in name."""
    top = module.split(".")[0]
    if top == "vllm":
        return device_type, None
    plugin = platform_plugin(module)
    return (str(plugin["entry_point"]) if plugin else top), plugin


def gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
    return False


def resolve_auto_target() -> tuple[str, str | None]:
    """(device name, note for the user or None)."""
    if rbln_plugin_installed():
        return "rbln", None
    if gpu_visible():
        return "cuda", None
    return "cpu", (
        "no RBLN plugin and no GPU found: --target auto fell back to cpu, "
        "so this is a CPU-against-CPU run (it checks the harness and run-to-run "
        "determinism, not an accelerator)"
    )


@lru_cache(maxsize=1)
def vllm_known_env_vars() -> frozenset[str] | None:
    """Names of the environment variables the installed vLLM reads (None: no vLLM).

    Read from ``vllm/envs.py`` as text: finding the spec of a top-level package
    does not import it.
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "envs.py"
        if path.is_file():
            return frozenset(re.findall(r'"(VLLM_[A-Z0-9_]+)"\s*:', path.read_text()))
    return frozenset()


def installed_version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
