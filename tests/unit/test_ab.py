"""``--ab NAME``: the preset registry and how a preset folds into the options (no engine starts here)."""

from __future__ import annotations

import pytest

from vllm_rbln_exec.core.errors import UsageError
from vllm_rbln_exec.setup.ab import PRESETS, check_preset_device, check_speculative, get_preset
from vllm_rbln_exec.setup.engine_args import check_engine_args
from vllm_rbln_exec.setup.options import build_options
from vllm_rbln_exec.verdict.presets import AB_TOLERANCES, preset_gates
from vllm_rbln_exec.verdict.spec import gates_for_run, resolve_gates

ISSUE_PRESETS = {"prefix-caching", "chunked-prefill", "batch-invariance", "eager", "spec-decode", "kv-cache-dtype",
                 "tp"}


def test_every_preset_of_the_issue_is_there_and_complete():
    assert set(PRESETS) == ISSUE_PRESETS
    assert set(AB_TOLERANCES) == ISSUE_PRESETS
    for preset in PRESETS.values():
        assert preset.question
        tolerances = AB_TOLERANCES[preset.name]
        assert tolerances.half, preset.name  # every preset judges half precision with its own tier
        for expr, why in tolerances.float32 + tolerances.half + tolerances.ignore:
            assert why and len(why) > 20, expr  # every number says why
        for tier in ("float32", "bfloat16"):
            preset_gates(preset.name, "float32", tier)  # every tolerance parses
        for role in ("reference", "target"):
            check_engine_args("vllm", getattr(preset, f"{role}_args"), role,
                              known_vllm=frozenset(getattr(preset, f"{role}_args")))


def test_an_unknown_preset_is_a_usage_error_with_a_suggestion():
    with pytest.raises(UsageError) as err:
        build_options(ab="prefix-cachng")
    assert err.value.exit_code == 2
    assert "Did you mean 'prefix-caching'?" in err.value.message
    assert "batch-invariance" in err.value.message


def test_a_preset_sets_both_sides_and_prompts_and_leaves_the_tolerances_to_the_verdict():
    options = build_options(ab="prefix-caching")
    assert options.ab == "prefix-caching"
    assert options.reference.engine_args == {"enable_prefix_caching": False}
    assert options.target.engine_args == {"enable_prefix_caching": True}
    assert options.capture.batch == 1
    assert options.capture.prompts == get_preset("prefix-caching").options["prompts"]
    assert options.gates.fail_on == ()  # chosen when the run's dtypes are known (verdict.presets)


def test_what_the_user_gives_overrides_the_preset():
    options = build_options(ab="chunked-prefill", target_args='{"max_num_batched_tokens": 32}', batch=2,
                            fail_on=("kl_max>1e-3", "max_abs>1e-2", "top1<0.5"), num_prompts=2)
    assert options.target.engine_args == {"enable_chunked_prefill": True, "max_num_batched_tokens": 32}
    assert options.capture.batch == 2
    assert options.gates.fail_on == ("kl_max>1e-3", "max_abs>1e-2", "top1<0.5")
    gates = resolve_gates(None, "m", "float32", "float32", options.gates.fail_on, ab="chunked-prefill")
    by_metric = {(g.metric, g.op): (g.base, g.source) for g in gates if hasattr(g, "base")}
    assert by_metric[("max_abs", ">")] == (1e-2, "cli")  # the user's max_abs replaces the preset's
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


def _sources(gates) -> dict[str, str]:
    return {getattr(g, "expr", None) or g.source: g.source for g in gates}


def test_preset_tolerances_follow_the_precision_of_the_run():
    f32 = resolve_gates(None, "m", "float32", "float32", ab="batch-invariance")
    bf16 = resolve_gates(None, "m", "bfloat16", "bfloat16", ab="batch-invariance")
    f32_metrics = {(g.metric, g.source) for g in f32 if hasattr(g, "metric")}
    bf16_metrics = {(g.metric, g.source) for g in bf16 if hasattr(g, "metric")}
    assert ("max_abs", "--ab batch-invariance (float32)") in f32_metrics
    # in bf16 a -20-nat logprob moves by 1 nat honestly: distributions are judged, never max_abs
    assert not any(m == "max_abs" for m, _ in bf16_metrics)
    assert ("kl_mean", "--ab batch-invariance (half)") in bf16_metrics
    # the preset's kl_mean replaces the bf16 default's (one gate per metric and direction)
    assert [g for g in bf16 if getattr(g, "metric", None) == "kl_mean" and g.scope == "overall"][0].base == 5e-3


def test_kv_cache_dtype_replaces_the_defaults_of_either_precision():
    for dtype in ("float32", "bfloat16"):
        gates = resolve_gates(None, "m", dtype, dtype, ab="kv-cache-dtype")
        assert not any(type(g).__name__ == "ArgmaxGate" for g in gates)  # the flip rate judges flips instead
        assert not any(getattr(g, "metric", None) == "kl_max" for g in gates)
        assert {g.source for g in gates if getattr(g, "metric", None) in ("kl_mean", "top1")} == {
            f"--ab kv-cache-dtype ({'float32' if dtype == 'float32' else 'half'})"}
    plain = resolve_gates(None, "m", "float32", "float32", ab="eager")
    assert any(type(g).__name__ == "ArgmaxGate" for g in plain)
    assert preset_gates(None, "float32", "float32") == ([], [])
    assert preset_gates("a-preset-of-a-later-version", "float32", "float32") == ([], [])


def test_a_saved_ab_run_is_judged_with_its_preset_again():
    run = {"model": "m", "options": {"ab": "eager"},
           "sides": {"reference": {"dtype": "bfloat16", "device": "cuda"},
                     "target": {"dtype": "bfloat16", "device": "cuda"}}}
    sources = {g.source for g in gates_for_run(run)}
    assert "--ab eager (half)" in sources
    assert "--ab eager (half)" not in {g.source for g in gates_for_run({**run, "options": {}})}


def test_a_reference_file_cannot_stand_in_for_side_a(tmp_path):
    file = tmp_path / "ref.vre"
    file.write_bytes(b"not read: refused before")
    with pytest.raises(UsageError, match="replace side A") as err:
        build_options(ab="eager", reference_file=str(file))
    assert err.value.exit_code == 2 and err.value.option == "--reference"
