"""Device profiles: loading and merging, worker environments, parallelism, --target auto."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_rbln_exec.core.errors import EXIT_USAGE, UsageError
from vllm_rbln_exec.setup import devices
from vllm_rbln_exec.setup.devices import (
    USER_FILE_ENV,
    DeviceProfile,
    get_profile,
    gpu_visible,
    load_profiles,
    platform_identity,
    platform_plugin,
    rbln_plugin_installed,
    resolve_auto_target,
)

BASE_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/user",
    "CUDA_VISIBLE_DEVICES": "0,1",
    "HIP_VISIBLE_DEVICES": "0",
    "RBLN_DEVICES": "0",
    "RBLN_KERNEL_MODE": "eager",
    "VLLM_RBLN_COMPILE": "1",
    "USE_VLLM_MODEL": "1",
    "VLLM_PLUGINS": "rbln",
    "VLLM_CPU_OMP_THREADS_BIND": "all",
    "VLLM_CACHE_ROOT": "/shared/vllm-cache",
}


@pytest.fixture(autouse=True)
def no_user_device_file(monkeypatch):
    monkeypatch.delenv(USER_FILE_ENV, raising=False)


@pytest.fixture
def profiles():
    return load_profiles()


def write(tmp_path: Path, text: str, name: str = "devices.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- shipped profiles ------------------------------------------------------------------
def test_shipped_profiles(profiles):
    assert {"cpu", "rbln", "cuda"} <= set(profiles)
    assert profiles["cpu"].platform == "cpu"
    assert profiles["rbln"].platform == "rbln"
    assert profiles["cuda"].platform == "cuda"
    assert all(p.name == name for name, p in profiles.items())
    assert profiles["cpu"].engine_default("dtype") == "float32"
    assert profiles["cpu"].engine_default("no-such-key", "fallback") == "fallback"
    assert profiles["rbln"].engine_default("block_size") == 8192
    assert set(profiles["rbln"].parallel) == {"tp", "pp", "dp", "ep"}


# -- build_env ---------------------------------------------------------------------------
def test_cpu_env_sets_and_scrubs(profiles, tmp_path):
    base = dict(BASE_ENV)
    env, record = profiles["cpu"].build_env(base, tmp_path / "cache-ref")

    assert base == BASE_ENV  # the caller's dict is not modified
    for gone in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "RBLN_DEVICES", "RBLN_KERNEL_MODE",
                 "VLLM_RBLN_COMPILE", "USE_VLLM_MODEL"):
        assert gone not in env
    assert env["PATH"] == BASE_ENV["PATH"] and env["HOME"] == BASE_ENV["HOME"]
    assert env["VLLM_PLUGINS"] == "cpu"  # set, overriding the inherited value
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "all"  # only the cuda profile scrubs VLLM_CPU_*
    assert record["scrubbed"] == sorted(["CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "RBLN_DEVICES",
                                         "RBLN_KERNEL_MODE", "VLLM_RBLN_COMPILE", "USE_VLLM_MODEL"])
    assert record["set"]["VLLM_PLUGINS"] == "cpu"


def test_rbln_and_cuda_envs(profiles, tmp_path):
    env, record = profiles["rbln"].build_env(dict(BASE_ENV), tmp_path / "c")
    assert "VLLM_PLUGINS" not in env and "CUDA_VISIBLE_DEVICES" not in env
    assert env["RBLN_DEVICES"] == "0"  # the rbln profile keeps the device selection
    assert env["RBLN_KERNEL_MODE"] == "triton"  # ... but sets its own kernel mode
    # the variable vllm-rbln reads since v0.9.2.post1; the old name is left as inherited
    assert env["VLLM_RBLN_USE_VLLM_MODEL"] == "1" and env["USE_VLLM_MODEL"] == BASE_ENV["USE_VLLM_MODEL"]
    assert env["VLLM_DISABLE_COMPILE_CACHE"] == "1"
    assert "RBLN_CACHE_DIR" not in env and "VLLM_USE_V1" not in env  # nothing in vllm-rbln v0.11.0 reads them
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "c" / "vllm_cache_root")  # where the plugin caches graphs

    env, record = profiles["cuda"].build_env(dict(BASE_ENV), tmp_path / "c")
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    for gone in ("VLLM_PLUGINS", "RBLN_DEVICES", "RBLN_KERNEL_MODE", "USE_VLLM_MODEL", "VLLM_RBLN_COMPILE",
                 "VLLM_CPU_OMP_THREADS_BIND"):
        assert gone not in env
    assert env["VLLM_TARGET_DEVICE"] == "cuda"


@pytest.mark.parametrize("name", ["cuda", "cuda-fp32"])
def test_cuda_workers_never_get_nvlink_multicast(profiles, tmp_path, name):
    # tensor parallelism must not turn NVLink multicast on (shared hosts); the workers inherit this environment
    env, _ = profiles[name].build_env({**BASE_ENV, "NCCL_NVLS_ENABLE": "1"}, tmp_path / "c")
    assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["NVSHMEM_DISABLE_NVLS"]) == (
        "0", "1", "1")


def test_env_if_known_only_when_vllm_reads_the_variable(profiles, tmp_path):
    cpu = profiles["cpu"]
    assert cpu.env_if_known  # the test needs one
    name, value = next(iter(cpu.env_if_known.items()))

    env, record = cpu.build_env({}, tmp_path, known_vars=None)  # no vLLM installed
    assert name not in env and name in record["skipped_unknown"]

    env, record = cpu.build_env({}, tmp_path, known_vars=frozenset({"VLLM_SOMETHING_ELSE"}))
    assert name not in env and name in record["skipped_unknown"]

    env, record = cpu.build_env({}, tmp_path, known_vars=frozenset({name}))
    assert env[name] == value and record["set"][name] == value
    assert name not in record["skipped_unknown"]


def test_cache_env_points_under_the_cache_dir_and_differs_per_side(profiles, tmp_path):
    cpu = profiles["cpu"]
    ref_dir, tgt_dir = tmp_path / "compile" / "reference-cpu", tmp_path / "compile" / "target-cpu"
    ref_env, _ = cpu.build_env(dict(BASE_ENV), ref_dir)
    tgt_env, _ = cpu.build_env(dict(BASE_ENV), tgt_dir)

    assert cpu.cache_env
    values = []
    for key in cpu.cache_env:
        assert Path(ref_env[key]).parent == ref_dir
        assert Path(tgt_env[key]).parent == tgt_dir
        assert ref_env[key] != tgt_env[key]
        values.append(ref_env[key])
    assert len(set(values)) == len(values)  # one folder per variable
    assert ref_env["VLLM_CACHE_ROOT"] != BASE_ENV["VLLM_CACHE_ROOT"]  # the inherited one is replaced


def test_extra_vars_are_applied_last(profiles, tmp_path):
    env, record = profiles["cpu"].build_env({}, tmp_path, extra={"VLLM_CPU_KVCACHE_SPACE": 2, "VLLM_PLUGINS": "x"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_PLUGINS"] == "x"
    assert record["set"]["VLLM_CPU_KVCACHE_SPACE"] == "2"


# -- user device files ---------------------------------------------------------------------
def test_user_file_overrides_and_adds(tmp_path):
    path = write(tmp_path, """
[device.cpu.engine]
dtype = "bfloat16"

[device.cpu]
description = "my cpu"

[device.npu]
platform = "npu"
description = "an added device"
env = { NPU_MODE = "fast" }
parallel = ["tp"]
""")
    profiles = load_profiles(path)
    cpu = profiles["cpu"]
    assert cpu.engine_default("dtype") == "bfloat16"  # overridden
    assert cpu.engine_default("block_size") == 128  # merged key by key: the rest is kept
    assert cpu.description == "my cpu"
    assert cpu.env["VLLM_PLUGINS"] == "cpu"
    assert {"rbln", "cuda"} <= set(profiles)
    npu = profiles["npu"]
    assert npu.platform == "npu" and npu.parallel == ["tp"]
    env, _ = npu.build_env({}, tmp_path)
    assert env["NPU_MODE"] == "fast"


def test_user_file_from_the_environment(tmp_path, monkeypatch):
    path = write(tmp_path, '[device.extra]\nplatform = "cpu"\n')
    monkeypatch.setenv(USER_FILE_ENV, str(path))
    assert "extra" in load_profiles()
    assert "extra" not in load_profiles(write(tmp_path, '[device.other]\nplatform = "cpu"\n', "b.toml"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[device.cpu]\nplatfrom = "cpu"\n', "unknown keys: platfrom"),
        ('[device.new]\nplatform = "x"\ncolour = "red"\n', "unknown keys: colour"),
        ('[device.new]\ndescription = "no platform"\n', "no 'platform'"),
        ('[device.new]\nplatform = "x"\nparallel = ["tp", "zp"]\n', "unknown parallel kinds"),
        ("[device.cpu\nplatform = cpu\n", "not valid TOML"),
    ],
    ids=["misspelt-key", "unknown-key", "no-platform", "bad-parallel", "invalid-toml"],
)
def test_bad_user_files_are_usage_errors(tmp_path, text, match):
    with pytest.raises(UsageError, match=match) as info:
        load_profiles(write(tmp_path, text))
    assert info.value.option == "--devices"
    assert info.value.exit_code == EXIT_USAGE


def test_missing_user_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_profiles(tmp_path / "nope.toml")


# -- parallelism -----------------------------------------------------------------------------
def test_check_parallel_rejects_what_the_profile_lacks(profiles):
    cpu_like = DeviceProfile(name="cpu-like", platform="cpu", parallel=[])
    with pytest.raises(UsageError, match="does not support --tp") as info:
        cpu_like.check_parallel(tp=2, pp=1, dp=1, ep=False)
    assert info.value.option == "--tp"
    assert "allowed: none" in info.value.message
    cpu_like.check_parallel(tp=1, pp=1, dp=1, ep=False)  # sizes of 1 and ep off use nothing
    with pytest.raises(UsageError, match="--ep"):
        cpu_like.check_parallel(ep=True)

    profiles["rbln"].check_parallel(tp=2, pp=2, dp=2, ep=True)

    with pytest.raises(UsageError, match=r"does not support --pp \(allowed: --tp\)"):
        profiles["cpu"].check_parallel(tp=1, pp=2)


def test_check_parallel_ignores_other_keywords():
    DeviceProfile(name="d", platform="cpu").check_parallel(batch=8, tp=1)


# -- lookup and --target auto ---------------------------------------------------------------
def test_get_profile(profiles):
    assert get_profile("rbln", profiles) is profiles["rbln"]
    with pytest.raises(UsageError) as info:
        get_profile("rbnl", profiles)
    assert "Did you mean 'rbln'?" in info.value.message
    assert "cpu, cuda, cuda-fp32, rbln" in info.value.message
    assert info.value.option == "--target"
    with pytest.raises(UsageError) as info:
        get_profile("zzzzzz", profiles, option="--devices")
    assert "Did you mean" not in info.value.message
    assert info.value.option == "--devices"


@pytest.mark.parametrize(
    ("rbln", "gpu", "expected"),
    [(True, True, "rbln"), (True, False, "rbln"), (False, True, "cuda"), (False, False, "cpu")],
)
def test_resolve_auto_target(monkeypatch, rbln, gpu, expected):
    monkeypatch.setattr(devices, "rbln_plugin_installed", lambda: rbln)
    monkeypatch.setattr(devices, "gpu_visible", lambda: gpu)
    name, note = resolve_auto_target()
    assert name == expected
    if expected == "cpu":
        assert note and "fell back to cpu" in note
    else:
        assert note is None


@pytest.mark.parametrize("value", ["", "-1"])
def test_gpu_hidden_by_cuda_visible_devices(monkeypatch, value):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert gpu_visible() is False


# -- which platform vLLM activated: a plugin is named by its entry point -------------------------------------
def plugin_dist(root: Path, entries: dict[str, str], dist: str = "some_plugin", version: str = "1.2.3") -> Path:
    """A distribution declaring ``entries`` (name -> "module:function") in vllm.platform_plugins, found by
    importlib.metadata once ``root`` is on sys.path; the modules themselves need not exist."""
    info = root / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[vllm.platform_plugins]\n{lines}")
    return root


def test_vllm_platforms_are_named_by_their_device_type():
    assert platform_identity("vllm.platforms.cpu", "cpu") == ("cpu", None)
    assert platform_identity("vllm.platforms.rocm", "cuda") == ("cuda", None)  # as before: ROCm is "cuda"


def test_a_plugin_platform_is_named_by_its_entry_point_not_its_device_type(tmp_path, monkeypatch):
    # vllm-rbln's RblnPlatform reports device_type "cpu": by device type, a reference that loaded it
    # would pass for the CPU
    monkeypatch.syspath_prepend(str(plugin_dist(tmp_path, {"rbln": "vllm_rbln_double:register"},
                                                dist="vllm_rbln_double")))
    name, plugin = platform_identity("vllm_rbln_double.platform", "cpu")
    assert name == "rbln"
    assert plugin == {"entry_point": "rbln", "value": "vllm_rbln_double:register",
                      "distribution": "vllm_rbln_double", "version": "1.2.3"}
    assert rbln_plugin_installed()  # and --target auto sees it


def test_a_plugin_class_no_single_entry_point_explains_is_named_by_its_package(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dist(tmp_path, {"one": "twin_plugin:a", "two": "twin_plugin.b:c"})))
    assert platform_plugin("twin_plugin.platform") is None
    assert platform_identity("twin_plugin.platform", "cpu") == ("twin_plugin", None)  # never "cpu"
    assert platform_identity("orphan_plugin.platform", "cpu") == ("orphan_plugin", None)
