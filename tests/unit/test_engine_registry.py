"""The engine registry and its out-of-tree hook (VLLM_RBLN_EXEC_ENGINES), and the fake engine's model folder."""

from __future__ import annotations

import json

import pytest
from tests.fakes.model import make_fake_model

from vllm_rbln_exec.core.errors import UsageError
from vllm_rbln_exec.core.registry import LazyRegistry, parse_entries
from vllm_rbln_exec.engines import ENGINES, ENGINES_ENV
from vllm_rbln_exec.setup.models import resolve_model, tokenizer_fingerprint, truncate_model, weights_fingerprint

FAKE = "fake=tests.fakes.engine:FakeEngine"


def test_builtin_engines_without_the_variable(monkeypatch):
    monkeypatch.delenv(ENGINES_ENV, raising=False)
    assert ENGINES.names() == ["transformers", "vllm"]
    with pytest.raises(UsageError, match="unknown engine 'fake'"):
        ENGINES.check("fake", option="--target-engine")


def test_the_variable_adds_engines_read_at_each_lookup(monkeypatch):
    monkeypatch.setenv(ENGINES_ENV, FAKE)
    assert ENGINES.names() == ["fake", "transformers", "vllm"]
    assert ENGINES.check("fake") == "fake"
    from tests.fakes.engine import FakeEngine

    assert ENGINES.load("fake") is FakeEngine
    monkeypatch.setenv(ENGINES_ENV, "")
    assert "fake" not in ENGINES.names()


def test_several_entries_and_separators():
    assert parse_entries(" a=m.x:A, b=n:B;c=o.p:C.D\nd=q:E ", "X") == {
        "a": "m.x:A", "b": "n:B", "c": "o.p:C.D", "d": "q:E"}
    assert parse_entries("", "X") == {}


@pytest.mark.parametrize("text, message", [
    ("fake", "is not NAME=module:Attr"),
    ("fake=tests.fakes.engine", "is not NAME=module:Attr"),
    ("=m:A", "is not NAME=module:Attr"),
    ("vllm=tests.fakes.engine:FakeEngine", "'vllm' is built in and cannot be replaced"),
])
def test_malformed_or_shadowing_entries_are_refused(monkeypatch, text, message):
    monkeypatch.setenv(ENGINES_ENV, text)
    with pytest.raises(UsageError, match=message) as info:
        ENGINES.names()
    assert f"${ENGINES_ENV}" in info.value.message


def test_load_follows_dotted_attributes_and_unknown_names_suggest(monkeypatch):
    monkeypatch.setenv("X_ENTRIES", "path=os:path.join")
    registry = LazyRegistry("thing", {"one": "os:getcwd"}, env_var="X_ENTRIES")
    import os

    assert registry.load("path") is os.path.join
    assert registry.load("one") is os.getcwd
    with pytest.raises(UsageError, match="Did you mean 'path'"):
        registry.load("paht")


def test_fake_model_folder_is_a_local_model(tmp_path):
    folder = make_fake_model(tmp_path / "fake", vocab_size=64, num_hidden_layers=3)
    resolved = resolve_model(str(folder), tmp_path / "models")
    assert resolved.path == folder.resolve() and not resolved.needs_conversion and resolved.tiny is None
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 64
    assert len(weights_fingerprint(folder)) == 24 and len(tokenizer_fingerprint(folder)) == 24
    cut = truncate_model(folder, 1, tmp_path / "models")
    assert json.loads((cut / "config.json").read_text())["num_hidden_layers"] == 1
    assert weights_fingerprint(cut) != weights_fingerprint(folder)
    assert tokenizer_fingerprint(cut) == tokenizer_fingerprint(folder)


# -- an out-of-tree engine is accepted wherever an engine is named ----------------------------------
def test_run_options_accept_a_registered_engine(monkeypatch, tmp_path):
    from vllm_rbln_exec.pipeline.context import RunContext
    from vllm_rbln_exec.pipeline.sides import resolve_devices
    from vllm_rbln_exec.setup.options import build_options

    monkeypatch.setenv(ENGINES_ENV, FAKE)
    options = build_options(target="cpu", reference_engine="fake", target_engine="fake")
    devices = resolve_devices(RunContext.create(str(tmp_path), None, 10.0), options)
    assert devices.target.name == "cpu"
    monkeypatch.delenv(ENGINES_ENV)
    with pytest.raises(UsageError, match="fake"):
        resolve_devices(RunContext.create(str(tmp_path), None, 10.0), options)


def test_the_worker_environment_keeps_the_harness_variables(tmp_path):
    from vllm_rbln_exec.setup.devices import load_profiles

    for name, profile in load_profiles().items():
        env, record = profile.build_env({ENGINES_ENV: FAKE, "VLLM_RBLN_EXEC_DEVICES": "x.toml"}, tmp_path)
        assert env.get(ENGINES_ENV) == FAKE, name
        assert ENGINES_ENV not in record["scrubbed"], name
