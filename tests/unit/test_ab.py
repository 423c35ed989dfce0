"""``--ab NAME``: the preset registry and how a preset folds into the options (no engine starts here)."""

from __future__ import annotations

import pytest

from vllm_rbln_exec.core.errors import UsageError
from vllm_rbln_exec.setup.ab import PRESETS, check_preset_device, check_speculative, get_preset
from vllm_rbln_exec.setup.engine_args import check_engine_args
from vllm_rbln_exec.setup.options import build_options
from vllm_rbln_exec.verdict.gates import parse_gate

ISSUE_PRESETS = {"prefix-caching", "chunked-prefill", "batch-invariance", "eager", "spec-decode", "kv-cache-dtype",
                 "tp"}


def test_every_preset_of_the_issue_is_there_and_complete():
    assert set(PRESETS) == ISSUE_PRESETS
    for preset in PRESETS.values():
        assert preset.question and preset.why and preset.fail_on
        for expr in preset.fail_on:
            parse_gate(expr)  # every tolerance parses
        for role in ("reference", "target"):
            check_engine_args("vllm", getattr(preset, f"{role}_args"), role,
                              known_vllm=frozenset(getattr(preset, f"{role}_args")))


def test_an_unknown_preset_is_a_usage_error_with_a_suggestion():
    with pytest.raises(UsageError) as err:
        build_options(ab="prefix-cachng")
    assert err.value.exit_code == 2
    assert "Did you mean 'prefix-caching'?" in err.value.message
    assert "batch-invariance" in err.value.message


def test_a_preset_sets_both_sides_prompts_and_gates():
    options = build_options(ab="prefix-caching")
    assert options.ab == "prefix-caching"
    assert options.reference.engine_args == {"enable_prefix_caching": False}
    assert options.target.engine_args == {"enable_prefix_caching": True}
    assert options.capture.batch == 1
    assert options.capture.prompts == get_preset("prefix-caching").options["prompts"]
    assert options.gates.fail_on == get_preset("prefix-caching").fail_on


def test_what_the_user_gives_overrides_the_preset():
    options = build_options(ab="chunked-prefill", target_args='{"max_num_batched_tokens": 32}', batch=2,
                            fail_on=("kl_max>1e-3", "max_abs>1e-2", "top1<0.5"), num_prompts=2)
    assert options.target.engine_args == {"enable_chunked_prefill": True, "max_num_batched_tokens": 32}
    assert options.capture.batch == 2
    # the user's max_abs replaces the preset's; the others add to it
    assert options.gates.fail_on == ("kl_max>1e-3", "max_abs>1e-2", "top1<0.5")
    assert options.capture.prompts == get_preset("chunked-prefill").options["prompts"][:2]
    given = build_options(ab="chunked-prefill", prompts=("hello",))
    assert given.capture.prompts == ("hello",)


def test_spec_decode_runs_free_and_refuses_forcing():
    options = build_options(ab="spec-decode")
    assert options.capture.align == "free"
    assert options.target.engine_args["speculative_config"]["method"] == "ngram"
    with pytest.raises(UsageError, match="Custom logits processors are not supported"):
        check_speculative(options.target.engine_args, "target", "forced")
    check_speculative(options.target.engine_args, "target", "free")


def test_tp_is_refused_on_the_cpu_before_any_engine():
    with pytest.raises(UsageError, match="--ab tp cannot run on 'cpu'"):
        check_preset_device("tp", "cpu")
    check_preset_device("tp", "cuda")
    check_preset_device(None, "cpu")


def test_per_side_batch_and_chunk_are_engine_arguments_now():
    check_engine_args("vllm", {"max_num_seqs": 1, "max_num_batched_tokens": 64}, "reference",
                      known_vllm=frozenset({"max_num_seqs", "max_num_batched_tokens"}))
    with pytest.raises(UsageError, match="--tp"):
        check_engine_args("vllm", {"tensor_parallel_size": 2}, "target", known_vllm=frozenset())
