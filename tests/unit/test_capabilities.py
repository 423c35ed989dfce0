"""What vLLM's CPU build can run on a processor (setup.capabilities), with the flag sets of real processors:
an AVX2-only AMD EPYC (issue 25's), an AVX-512 Skylake without BF16, and this project's Xeon with AVX512-BF16."""

from __future__ import annotations

import pytest

from vllm_rbln_exec.outputs.corpus_view import table_rows
from vllm_rbln_exec.setup.capabilities import (
    WNA16_OP,
    kernel_gap,
    library_has_op,
    missing_op_sentence,
    needed_op,
    parse_cpu_flags,
    vllm_cpu_library,
)

EPYC_AVX2 = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 bmi2 avx2 sha_ni clzero".split())
SKYLAKE_AVX512 = EPYC_AVX2 | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}
XEON_BF16 = SKYLAKE_AVX512 | {"avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}
# what `grep -c cpu_gemm_wna16` finds in vLLM 0.32's CPU wheel: the AVX2 library has no WNA16 kernel
OPS = {"_C": {WNA16_OP, "onednn_scaled_mm"}, "_C_AVX512": {WNA16_OP, "onednn_scaled_mm"},
       "_C_AVX2": {"onednn_scaled_mm"}}


def has_op(library, op):
    return op in OPS[library]


def compressed(weight_bits, act_bits=None, weight_type="int"):
    group = {"weights": {"num_bits": weight_bits, "type": weight_type, "strategy": "group", "group_size": 64}}
    if act_bits:
        group["input_activations"] = {"num_bits": act_bits, "type": weight_type, "dynamic": True}
    return {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}}}


W4A16 = compressed(4)


def test_the_library_is_chosen_as_torch_and_vllm_choose_it():
    assert vllm_cpu_library(EPYC_AVX2, "x86_64").name == "_C_AVX2"
    assert "avx512f" in vllm_cpu_library(EPYC_AVX2, "x86_64").why
    assert vllm_cpu_library(SKYLAKE_AVX512, "x86_64").name == "_C_AVX512"
    assert vllm_cpu_library(XEON_BF16, "x86_64").name == "_C"
    assert vllm_cpu_library(SKYLAKE_AVX512 - {"avx512vl"}, "x86_64").name == "_C_AVX2"  # torch needs all four
    assert vllm_cpu_library(frozenset(), "aarch64").name == "_C"


def test_flags_come_from_cpuinfo_text():
    text = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\n"
    assert parse_cpu_flags(text) == {"fpu", "avx", "avx2", "fma"}
    assert parse_cpu_flags("processor: 0\n") == frozenset()


def test_the_schemes_that_need_the_wna16_kernel():
    assert needed_op(W4A16) == ("W4A16", WNA16_OP)
    assert needed_op(compressed(4, 8)) == ("W4A8", WNA16_OP)  # vLLM 0.32's CPU runs it with the same kernel
    assert needed_op({"quantization_config": {"quant_method": "gptq", "bits": 4}}) == ("GPTQ int4", WNA16_OP)
    assert needed_op({"quantization_config": {"quant_method": "awq"}}) == ("AWQ int4", WNA16_OP)
    for runs_anywhere in (compressed(8, 8), compressed(8, 8, "float"), {}, {"quantization_config": None}):
        assert needed_op(runs_anywhere) is None


def test_w4a16_is_refused_on_avx2_in_one_sentence_naming_what_is_missing_and_what_runs_instead():
    why = kernel_gap(EPYC_AVX2, "x86_64", has_op, W4A16, "0.32.0")
    assert why is not None and "\n" not in why and why.count(". ") == 0
    assert WNA16_OP in why and "vllm/_C_AVX2" in why and "vLLM 0.32.0's CPU build" in why
    assert "engine=transformers" in why and "W8A8" in why


@pytest.mark.parametrize("flags", [SKYLAKE_AVX512, XEON_BF16])
def test_w4a16_runs_where_the_library_has_the_kernel(flags):
    assert kernel_gap(flags, "x86_64", has_op, W4A16) is None


def test_other_formats_and_unknown_builds_are_never_refused():
    for config in (compressed(8, 8), compressed(8, 8, "float"), {}):
        assert kernel_gap(EPYC_AVX2, "x86_64", has_op, config) is None
    assert kernel_gap(EPYC_AVX2, "x86_64", lambda lib, op: None, W4A16) is None  # no library found: cannot tell


def test_an_operator_is_found_in_the_library_bytes(tmp_path):
    (tmp_path / "_C.abi3.so").write_bytes(b"\x7fELF...cpu_gemm_wna16(Tensor input, Tensor q_weight)...")
    (tmp_path / "_C_AVX2.abi3.so").write_bytes(b"\x7fELF...onednn_scaled_mm(Tensor a)...cpu_gemm_wna16_isa...")
    assert library_has_op(str(tmp_path), "_C", WNA16_OP) is True
    assert library_has_op(str(tmp_path), "_C_AVX2", WNA16_OP) is False  # a longer name is not the operator
    assert library_has_op(str(tmp_path), "_C_AVX512", WNA16_OP) is None


def test_a_missing_operator_in_a_worker_becomes_one_sentence():
    op_error = AttributeError("'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'")
    try:
        try:
            raise op_error
        except AttributeError as inner:
            raise RuntimeError("EngineCore encountered an issue") from inner
    except RuntimeError as outer:
        wrapped = outer
    for error in (op_error, wrapped):
        sentence = missing_op_sentence(error)
        assert sentence is not None and "torch.ops._C.cpu_gemm_wna16" in sentence and "\n" not in sentence
    assert missing_op_sentence(AttributeError("'NoneType' object has no attribute 'shape'")) is None
    assert missing_op_sentence(RuntimeError("'_OpNamespace' '_C' object has no attribute 'x'")) is None


def test_the_corpus_table_names_a_skipped_side():
    result = {"sides": [], "skipped": [{"label": "W4A16", "engine": "vllm", "device": "cpu", "dtype": "bfloat16",
                                         "quantization": {"weights": "int4/g64", "activations": None},
                                         "why": "W4A16 needs the kernel cpu_gemm_wna16 ..."}]}
    (row,) = table_rows(result)
    assert row[0] == "W4A16" and "int4/g64" in row[1] and "skipped" in row
