"""Parity spec files: format, precedence, sources and the errors they give (vllm_rbln_exec.verdict.spec)."""

from __future__ import annotations

import textwrap

import pytest

from vllm_rbln_exec.core.errors import UsageError
from vllm_rbln_exec.verdict.gates import ArgmaxGate, MetricGate
from vllm_rbln_exec.verdict.spec import ParitySpec, gates_for_run, load_spec, parse_spec, resolve_gates

SPEC = """
fail-on = ["kl_mean>1e-3", "prompt:kl_max>0.5"]
near-ties-fail = false

[dtypes."*:bfloat16"]
fail-on = ["kl_mean>4e-3"]

[dtypes."fp32:bf16"]
fail-on = ["kl_mean>5e-3", "top1<0.8"]

[models."smollm2-135m"]
fail-on = ["top1<0.99", "top1>1.5"]

[models."smollm2-135m".dtypes."float32:bfloat16"]
fail-on = ["prompt:kl_max>0.2"]
near-ties-fail = true
"""


def write(tmp_path, text, name="parity.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def by_text(gates):
    return {g.text: g.source for g in gates}


def metric_texts(gates):
    return sorted(g.text for g in gates if isinstance(g, MetricGate))


# -- precedence -------------------------------------------------------------------------
def test_most_specific_expression_wins_per_metric_scope_and_direction(tmp_path):
    path = write(tmp_path, SPEC)
    spec = load_spec(path)
    gates = resolve_gates(spec, "smollm2-135m", "float32", "bfloat16", use_defaults=False)
    texts = by_text(gates)
    # kl_mean: root 1e-3 < "*:bfloat16" 4e-3 < exact pair 5e-3, the last one stays
    assert [t for t in texts if t.startswith("kl_mean")] == ["kl_mean>5e-3"]
    assert texts["kl_mean>5e-3"] == f'spec {path} [dtypes."fp32:bf16"]'
    # top1 lower bound: the model's table replaces the pair's; its upper bound is another key and stays
    assert "top1<0.8" not in texts and "top1<0.99" in texts and "top1>1.5" in texts
    # prompt:kl_max: the model+dtype table replaces the root's
    assert "prompt:kl_max>0.5" not in texts
    assert texts["prompt:kl_max>0.2"] == f'spec {path} [models."smollm2-135m".dtypes."float32:bfloat16"]'
    (rule,) = [g for g in gates if isinstance(g, ArgmaxGate)]
    assert rule.near_ties_fail and rule.source.endswith('[models."smollm2-135m".dtypes."float32:bfloat16"]')


def test_command_line_comes_last(tmp_path):
    spec = load_spec(write(tmp_path, SPEC))
    gates = resolve_gates(spec, "smollm2-135m", "float32", "bfloat16", ["kl_mean>0.02", "prompt:kl_mean>0.1"],
                          use_defaults=False, near_ties_fail=False)
    texts = by_text(gates)
    assert texts["kl_mean>0.02"] == "cli" and "kl_mean>5e-3" not in texts
    assert texts["prompt:kl_mean>0.1"] == "cli"
    (rule,) = [g for g in gates if isinstance(g, ArgmaxGate)]
    assert not rule.near_ties_fail and rule.source == "cli"


def test_other_models_and_dtypes_do_not_match(tmp_path):
    spec = load_spec(write(tmp_path, SPEC))
    gates = resolve_gates(spec, "llama3-8b", "float32", "float32", use_defaults=False)
    assert metric_texts(gates) == ["kl_mean>1e-3", "prompt:kl_max>0.5"]
    # near-ties-fail = false in the root table still asks for the argmax rule
    assert [g.near_ties_fail for g in gates if isinstance(g, ArgmaxGate)] == [False]


def test_model_table_matches_a_folder_by_its_name(tmp_path):
    spec = load_spec(write(tmp_path, SPEC))
    gates = resolve_gates(spec, "/data/models/smollm2-135m/", "float32", "float16", use_defaults=False)
    assert "top1<0.99" in by_text(gates)


def test_one_layer_keeps_several_tolerances_on_one_metric():
    spec = parse_spec({"fail-on": ["kl_mean>1e-3", "kl_mean>=0.5"]}, "inline")
    assert metric_texts(resolve_gates(spec, None, "float32", "float32", use_defaults=False)) == [
        "kl_mean>1e-3", "kl_mean>=0.5"]


def test_defaults_come_first_and_are_replaced_by_the_spec():
    spec = parse_spec({"fail-on": ["kl_mean>0.05"]}, "inline")
    gates = resolve_gates(spec, "m", "float32", "bfloat16")
    texts = by_text(gates)
    assert texts["kl_mean>0.05"] == "spec inline"
    assert texts["kl_p99>1e-1"] == "default (float32:bfloat16)"
    assert "kl_mean>1e-2" not in texts
    assert "argmax:confident" in texts


def test_defaults_switches():
    spec = parse_spec({"defaults": False, "fail-on": ["top1<0.5"]}, "inline")
    assert metric_texts(resolve_gates(spec, "m", "float32", "float32")) == ["top1<0.5"]
    on = parse_spec({"defaults": True}, "inline")
    assert resolve_gates(on, "m", "float32", "float32", use_defaults=False) == []
    # a model table can turn them back on
    back = parse_spec({"defaults": False, "models": {"m": {"defaults": True}}}, "inline")
    assert "kl_mean>3e-8" in by_text(resolve_gates(back, "m", "float32", "float32"))


def test_ignore_drops_inherited_gates():
    spec = parse_spec({"ignore": ["kl_p99", "argmax", "prompt:kl_mean"]}, "inline")
    texts = by_text(resolve_gates(spec, "m", "float32", "float16"))
    assert "kl_p99>2e-2" not in texts and "prompt:kl_mean>1e-2" not in texts
    assert "argmax:confident" not in texts and "argmax:any" not in texts
    assert "kl_mean>2e-3" in texts


def test_auto_dtype_selects_the_matching_table():
    spec = parse_spec({"dtypes": {"float32:bfloat16": {"fail-on": ["kl_mean>0.123"]}}}, "inline")
    assert "kl_mean>0.123" in by_text(resolve_gates(spec, "m", "auto", "auto", tgt_device="cuda"))
    assert "kl_mean>0.123" not in by_text(resolve_gates(spec, "m", "auto", "auto", tgt_device="cpu"))


def test_gates_for_run_reads_model_and_dtypes():
    run = {"model": "smollm2-135m", "target": "cuda", "settings": {},
           "sides": {"reference": {"device": "cpu", "dtype": "float32"},
                     "target": {"device": "cuda", "dtype": "bfloat16"}}}
    spec = parse_spec({"models": {"smollm2-135m": {"dtypes": {"float32:bfloat16": {"fail-on": ["top1<0.42"]}}}}},
                      "inline")
    texts = by_text(gates_for_run(run, spec, ["kl_max>1"]))
    assert "top1<0.42" in texts and "kl_max>1" in texts and "kl_mean>1e-2" in texts


def test_no_spec_is_the_defaults_and_the_command_line():
    gates = resolve_gates(None, "m", "float32", "float32", ["kl_max>0.5"])
    assert by_text(gates)["kl_max>0.5"] == "cli" and "kl_max>1e-2" not in by_text(gates)
    assert resolve_gates(ParitySpec.empty(), "m", "float32", "float32", use_defaults=False) == []


# -- finding the spec -----------------------------------------------------------------------
def test_pyproject_table_in_the_current_directory(tmp_path):
    write(tmp_path, """
        [project]
        name = "x"
        [tool.vllm-rbln-exec]
        fail-on = ["kl_mean>0.25"]
        [tool.vllm-rbln-exec.models."m".dtypes."float32:float32"]
        fail-on = ["top1<0.5"]
    """, "pyproject.toml")
    spec = load_spec(cwd=tmp_path)
    gates = resolve_gates(spec, "m", "float32", "float32", use_defaults=False)
    texts = by_text(gates)
    assert texts["kl_mean>0.25"] == f"spec {tmp_path / 'pyproject.toml'} [tool.vllm-rbln-exec]"
    assert texts["top1<0.5"].endswith('[tool.vllm-rbln-exec.models."m".dtypes."float32:float32"]')
    # --spec may name a pyproject too
    assert metric_texts(resolve_gates(load_spec(tmp_path / "pyproject.toml"), "x", "float32", "float32",
                                      use_defaults=False)) == ["kl_mean>0.25"]


def test_no_pyproject_or_no_table_is_an_empty_spec(tmp_path):
    assert load_spec(cwd=tmp_path).root is None
    write(tmp_path, '[project]\nname = "x"\n', "pyproject.toml")
    assert load_spec(cwd=tmp_path).root is None
    with pytest.raises(UsageError, match=r"no \[tool.vllm-rbln-exec\] table"):
        load_spec(tmp_path / "pyproject.toml")


# -- errors -----------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist") as exc:
        load_spec(tmp_path / "nope.toml")
    assert exc.value.option == "--spec"


def test_bad_toml_names_the_file(tmp_path):
    path = write(tmp_path, 'fail-on = ["kl_mean>1"\n')
    with pytest.raises(UsageError, match="not valid TOML") as exc:
        load_spec(path)
    assert str(path) in exc.value.message


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ('fail_on = ["kl_mean>1"]', "fail_on", "Did you mean 'fail-on'"),
    ('[models."m"]\nfail-om = []', 'models."m".fail-om', "unknown key"),
    ('[dtypes."float32:float32"]\ndtypes = {}', 'dtypes."float32:float32".dtypes', "unknown key"),
    ('fail-on = ["kl_mean=1"]', "fail-on[0]", "malformed tolerance 'kl_mean=1'"),
    ('[models."m"]\nfail-on = ["ok>1"]', 'models."m".fail-on[0]', "unknown metric 'ok'"),
    ('fail-on = [1]', "fail-on[0]", "must be a string"),
    ('fail-on = 3', "fail-on", "must be a list"),
    ('near-ties-fail = "yes"', "near-ties-fail", "true or false"),
    ('defaults = 1', "defaults", "true or false"),
    ('ignore = ["kl_mena"]', "ignore", "Did you mean 'kl_mean'"),
    ('[dtypes."float32"]', 'dtypes."float32"', "REFERENCE:TARGET"),
    ('[dtypes."float32:fp33"]', 'dtypes."float32:fp33"', "unknown dtype 'fp33'"),
    ('[dtypes."auto:float32"]', 'dtypes."auto:float32"', "not auto"),
    ('[dtypes."fp32:bf16"]\n[dtypes."float32:bfloat16"]', 'dtypes."float32:bfloat16"', "same pair"),
    ('models = 3', "models", "table of model names"),
])  # fmt: skip
def test_spec_errors_name_the_file_and_key(tmp_path, text, key, fragment):
    path = write(tmp_path, text + "\n")
    with pytest.raises(UsageError) as exc:
        load_spec(path)
    assert exc.value.message.startswith(f"{path}: {key}: "), exc.value.message
    assert fragment in exc.value.message
    assert exc.value.option == "--spec"


def test_pyproject_errors_carry_the_tool_prefix(tmp_path):
    write(tmp_path, '[tool.vllm-rbln-exec]\nfail-on = ["top2<1"]\n', "pyproject.toml")
    with pytest.raises(UsageError, match=r"pyproject.toml: tool.vllm-rbln-exec.fail-on\[0\]: unknown metric 'top2'"):
        load_spec(cwd=tmp_path)
