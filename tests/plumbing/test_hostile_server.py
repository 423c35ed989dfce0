"""A hostile server as ``--target-url``, over a real loopback socket, through the real CLI (issue 26, items 3 and
6-9): each case ends with exit 2 or 3 and one sentence, within a bounded time (a hang guard, not a speed
test), with no traceback, no API key in any output or file, and nothing left behind (no process, no scratch
file, and no run folder when the probe refused the server: no engine started). The server
(tests/fakes/hostile.py) runs in a thread of this process and stops by itself.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.fakes.hostile import HostileServer
from tests.fakes.server import FakeServer
from tests.helpers import FAKE_CLI, FAKE_MAX_TOKENS, FAKE_PROMPTS, fake_env, processes_mentioning

pytestmark = pytest.mark.plumbing
KEY = "sk-hostile-4242-secret"


def run_against(url: str, tmp_path: Path, fake_model: Path, *args: str, env: dict | None = None,
                limit_s: float = 60) -> tuple[int, str, str, float, Path]:
    run_dir = tmp_path / "run"
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    full_env = {**fake_env(), "TMPDIR": str(scratch), **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", FAKE_CLI, "--model", str(fake_model), "--reference-engine", "fake",
         "--max-tokens", str(FAKE_MAX_TOKENS), "--num-prompts", str(FAKE_PROMPTS), "--yardstick", "none",
         "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir), "--no-color",
         "--target-url", url, *args],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=limit_s)
    wall = time.monotonic() - t0
    assert processes_mentioning(run_dir) == [] and list(scratch.iterdir()) == []
    return proc.returncode, proc.stdout, proc.stderr, wall, run_dir


def one_sentence(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(" ")]
    errors = [line for line in lines if line.startswith(("error:", "usage error:"))]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return " ".join(stderr[stderr.index(errors[0]):].split())


@pytest.mark.parametrize("path, args, bound_s", [
    ("/v1/completions", ("--timeout", "4", "--server-retries", "0"), 4),  # the probe's completion drips
    ("/v1/models", ("--timeout", "4"), 4),
])
def test_a_dripping_server_ends_the_run_at_the_deadline(tmp_path, fake_model, path, args, bound_s):
    with HostileServer(behaviour="drip", path=path, drip_s=1.0) as url:
        rc, _, err, wall, run_dir = run_against(url, tmp_path, fake_model, *args)
    assert rc == 3 and f"did not send its whole answer within {bound_s} s" in one_sentence(err)
    assert wall < bound_s + 30  # a hang guard: the drip alone lasts for a day
    assert not run_dir.exists()  # refused by the probe, before any model work or engine


def test_a_dripping_version_probe_is_bounded_too(tmp_path, fake_model):
    # /version is optional (other servers have none): past its deadline the probe goes on without it
    with HostileServer(FakeServer(vocab=257, llama_cpp=True), behaviour="drip", path="/version", drip_s=1.0) as url:
        rc, _, err, wall, _ = run_against(url, tmp_path, fake_model, "--timeout", "3")
    assert rc == 3 and "takes only text prompts" in one_sentence(err) and wall < 3 + 30


def test_a_300_mb_models_list_is_refused_without_being_read(tmp_path, fake_model):
    server = HostileServer(behaviour="huge", path="/v1/models")
    with server as url:
        rc, _, err, _, _ = run_against(url, tmp_path, fake_model)
    assert rc == 3 and "answer grew past 4.2 MB" in one_sentence(err)
    assert server.sent < 100 << 20  # the client stopped reading long before the 300 MB


@pytest.mark.parametrize("behaviour, said", [
    ("nested", "HTTP 500: an error body nested deeper than 64 levels (not shown)"),
    ("markup", "HTTP 400: model [/] not [bold red]found[/bold red] [link=file:///etc/passwd]here[/link] [/"),
])
def test_nested_json_and_markup_in_a_servers_error_are_one_sentence(tmp_path, fake_model, behaviour, said):
    with HostileServer(behaviour=behaviour, path="/v1/models") as url:
        rc, _, err, _, _ = run_against(url, tmp_path, fake_model, "--server-retries", "0")
    assert rc == 3 and said in one_sentence(err)


@pytest.mark.parametrize("bad, said", [("5.0", r"a logprob is +5, above 0"), ("nan", "a logprob is NaN"),
                                       ("inf", "a logprob is +Infinity")])
def test_impossible_logprobs_never_pass(tmp_path, fake_model, bad, said):
    # bad_from=1: the probe's answer is sound, the capture's are not (the probe refuses them too: unit tests)
    fake = FakeServer(vocab=257, bad_value=float(bad), bad_from=1)
    with HostileServer(fake) as url:
        rc, out, err, _, _ = run_against(url, tmp_path, fake_model)
    sentence = one_sentence(err)
    assert rc == 3 and "the target server's logprobs at prompt" in sentence and said in sentence
    assert "padded" not in sentence and "PARITY HOLDS" not in out


def test_llama_cpp_python_is_refused_by_the_probe_before_any_engine_with_advice(tmp_path, fake_model):
    fake = FakeServer(vocab=257, llama_cpp=True)
    with HostileServer(fake) as url:
        rc, _, err, _, run_dir = run_against(url, tmp_path, fake_model, "--server-scoring", "echo")
    sentence = one_sentence(err)
    assert rc == 3 and "validation errors" in sentence and "takes only text prompts" in sentence
    assert "try --server-logprobs 20" in sentence
    assert not run_dir.exists() and "reference" not in err.split("error:")[0]  # no reference was captured
    assert len(fake.requests) == 4  # the probe and its three variants, none retried


def test_a_key_holding_a_newline_is_refused_and_never_shown(tmp_path, fake_model):
    with HostileServer(FakeServer(vocab=257, api_key=KEY)) as url:
        rc, out, err, _, run_dir = run_against(url, tmp_path, fake_model, "--api-key-env", "VRE_TEST_KEY",
                                               env={"VRE_TEST_KEY": f"{KEY}\nX-Injected: 1"})
    assert rc == 2 and "a character an HTTP header cannot carry" in one_sentence(err)
    assert KEY not in out + err and not run_dir.exists()


def test_the_keys_variable_reaches_no_worker(tmp_path, fake_model):
    # The key's variable is VRE_FAKE_CRASH, which makes the fake engine crash at start wherever it is set:
    # the run passing through the reference worker shows that the worker never had it.
    with HostileServer(FakeServer(vocab=257, api_key="start")) as url:
        rc, out, err, _, run_dir = run_against(url, tmp_path, fake_model, "--api-key-env", "VRE_FAKE_CRASH",
                                               env={"VRE_FAKE_CRASH": "start"})
    assert rc in (0, 1), err  # the fake server's model is not the fake engine's: parity may fail, the run ran
    assert "worker" not in err and (run_dir / "reference").is_dir()


def test_a_good_key_is_in_no_output_and_no_file(tmp_path, fake_model):
    with HostileServer(FakeServer(vocab=257, api_key=KEY)) as url:
        rc, out, err, _, run_dir = run_against(url, tmp_path, fake_model, "--api-key-env", "VRE_TEST_KEY",
                                               "--json", str(tmp_path / "parity.json"), env={"VRE_TEST_KEY": KEY})
    assert rc in (0, 1), err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5 and not any(KEY.encode() in p.read_bytes() for p in files) and KEY not in out + err
