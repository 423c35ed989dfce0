"""A hostile or merely different server (``remote``), on fake transports: deadlines, size caps, nested and
marked-up error text, numbers that are not log-probabilities, the API key, and the probe that asks what the
capture will ask (with llama-cpp-python's refusals). The same cases over a real loopback socket, through the
CLI: tests/plumbing/test_hostile_server.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from tests.fakes.server import FakeServer, transport

from vllm_rbln_exec.capture.store import FULL, TOPN, CaptureWriter, SideInfo
from vllm_rbln_exec.compare.captures import compare_captures
from vllm_rbln_exec.compare.partial import kl_tail_bucket
from vllm_rbln_exec.compare.sanity import impossible_entries
from vllm_rbln_exec.core.errors import EXIT_HARNESS, EXIT_USAGE, HarnessError, UsageError
from vllm_rbln_exec.remote.capture import ServedPrompt, capture_server, side_info
from vllm_rbln_exec.remote.client import (
    ERROR_BODY_CAP,
    Endpoint,
    Reply,
    ServerClient,
    ServerError,
    error_text,
    load_json,
)
from vllm_rbln_exec.remote.probe import ECHO, GENERATE, probe_logprobs, probe_server, response_cap
from vllm_rbln_exec.remote.rows import ImpossibleRows, rows_of
from vllm_rbln_exec.setup.server import read_api_key

URL = "http://fake:8000/v1"
IDS = [9, 10, 11, 12, 13]
KEY = "sk-hostile-0123456789"


def endpoint(**kw) -> Endpoint:
    return Endpoint(base=URL, **{"retries": 3, "read_timeout": 30.0, "concurrency": 2, **kw})


async def _no_sleep(s):
    pass


def probe(server: FakeServer, prompt=None, asked: int = -1, how: str = "forced", scoring: str = "auto", **kw):
    async def go():
        async with ServerClient(endpoint(**kw), transport(server), sleep=_no_sleep) as client:
            info = await probe_server(client, None)
            await probe_logprobs(client, info, list(IDS) if prompt is None else prompt, asked, scoring, how)
            return info, client.traffic

    return asyncio.run(go())


def send(handler, *, cap: int = 1 << 20, timeout: float | None = None, **kw) -> Reply:
    async def go():
        async with ServerClient(endpoint(**kw), httpx.MockTransport(handler), sleep=_no_sleep) as client:
            return await client.send("GET", f"{URL}/models", timeout=timeout, cap=cap)

    return asyncio.run(go())


class Drip(httpx.AsyncByteStream):
    """A body that arrives one byte every ``every`` seconds, for ever; counts what was pulled."""

    def __init__(self, every: float = 0.05, chunk: bytes = b" "):
        self.every, self.chunk, self.pulled = every, chunk, 0

    async def __aiter__(self):
        while True:
            await asyncio.sleep(self.every)
            self.pulled += 1
            yield self.chunk


# -- item 7: a total deadline per request, and capped sizes ---------------------------------------------
def test_a_dripping_body_ends_at_the_deadline_not_at_each_byte():
    body = Drip(every=0.05)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"did not send its whole answer within 0.5 s") as err:
        send(lambda r: httpx.Response(200, stream=body), timeout=0.5)
    assert time.monotonic() - t0 < 5.0  # a hang guard: a between-bytes timeout would never end
    assert body.pulled >= 2 and err.value.exit_code == EXIT_HARNESS


def test_a_body_past_its_cap_is_refused_as_it_streams_and_a_declared_one_before_reading():
    body = Drip(every=0.0, chunk=b" " * 4096)
    with pytest.raises(ServerError, match="grew past 65536 bytes.*reading stopped there"):
        send(lambda r: httpx.Response(200, stream=body), cap=1 << 16)
    assert body.pulled == 17  # the first chunk past the cap, then no more
    declared = Drip(every=0.0)
    with pytest.raises(ServerError, match="announces a 300.0 MB answer.*it was not read"):
        send(lambda r: httpx.Response(200, headers={"content-length": str(300_000_000)}, stream=declared))
    assert declared.pulled == 0


def test_an_error_body_is_cut_at_its_cap_and_its_message_shown():
    body = Drip(every=0.0, chunk=b'{"error": {"message": "no such model"}}' + b" " * 70_000)
    reply = send(lambda r: httpx.Response(404, stream=body), cap=1 << 30)
    assert reply.status_code == 404 and len(reply.content) == ERROR_BODY_CAP
    assert error_text(reply) == "no such model"


def test_caps_are_stated_from_vocabulary_and_positions():
    assert response_cap(10, -1, 49152) == (1 << 20) + 10 * 49152 * 256  # full rows: 126 MB for 10 positions
    assert response_cap(10, 20, 49152) == (1 << 20) + 10 * 21 * 256


# -- item 8: deterministic refusals are not retried; item 9: nested and marked-up text ------------------
def test_a_500_validation_error_is_not_retried_and_a_plain_500_is():
    calls = []

    def refuse(message):
        def handler(request):
            calls.append(request)
            return httpx.Response(500, json={"error": {"message": message}})
        return handler

    assert send(refuse("1 validation error for CreateCompletionRequest")).status_code == 500
    assert len(calls) == 1
    calls.clear()
    assert send(refuse("CUDA out of memory")).status_code == 500
    assert len(calls) == 4  # 1 + --server-retries 3


def test_nested_json_is_refused_at_a_depth_limit_and_error_text_is_one_clean_line():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ValueError, match="nested deeper than 64 levels"):
        load_json(deep)
    assert load_json(b'{"a": "[[[[" , "b": [[1]]}') == {"a": "[[[[", "b": [[1]]}  # brackets in strings count not
    nested = Reply(500, httpx.Headers(), b'{"error": {"message": ' + deep + b"}}")
    assert error_text(nested) == "an error body nested deeper than 64 levels (not shown)"
    marked = Reply(400, httpx.Headers(), json.dumps({"detail": "bad [/]\n[bold]x\x1b[31m"}).encode())
    assert error_text(marked) == "bad [/] [bold]x [31m"  # one line, no control characters; escaped when printed


@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions"])
def test_deeply_nested_answers_are_one_sentence(path):
    server = FakeServer()
    deep = b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def handler(request):
        return httpx.Response(200, content=deep) if request.url.path == path else server(request)

    async def go():
        async with ServerClient(endpoint(), httpx.MockTransport(handler), sleep=_no_sleep) as client:
            info = await probe_server(client, None)
            await probe_logprobs(client, info, list(IDS), -1, "auto", "forced")

    with pytest.raises(ServerError, match="nested deeper than 64 levels"):
        asyncio.run(go())


def test_markup_in_an_error_is_printed_as_text(capsys):
    from vllm_rbln_exec.cli.common import report_error

    assert report_error(ServerError("HTTP 400: model [/] not [bold red]found[/bold red] [/"), no_color=True) == 3
    assert "model [/] not [bold red]found[/bold red] [/" in " ".join(capsys.readouterr().err.split())


# -- item 3: numbers that cannot be log-probabilities -----------------------------------------------------
@pytest.mark.parametrize("vals, full, what", [
    ([5.0, -1.0], False, r"a logprob is \+5, above 0"),
    ([float("nan"), -1.0], False, "a logprob is NaN"),
    ([float("inf"), -1.0], False, r"a logprob is \+Infinity"),
    ([np.log(0.8), np.log(0.7)], False, r"sum to 1.5, above 1 \+ 0.001"),  # each below 0, together above 1
    ([np.log(0.5), np.log(0.3)], True, r"sum to 0.8, below 1 - 0.001"),  # a whole row that does not normalise
])
def test_impossible_values_are_named(vals, full, what):
    entries = [(np.arange(2), np.log(np.full(2, 0.5)), None),
               (np.array([0, 1]), np.array(vals, dtype=np.float64), None)]
    with pytest.raises(ImpossibleRows, match=f"position 1: .*{what}"):
        rows_of(entries, [1, 0], -1 if full else 1, 2)


def test_possible_values_pass_within_the_tolerance():
    assert impossible_entries(np.log([0.5, 0.5005]), full=True) is None  # q16 and rounding stay far inside
    assert impossible_entries(np.array([2e-4, -np.inf]), full=False) is None
    assert impossible_entries(np.log([0.3, 0.2]), full=False) is None  # top-N: the rest is the tail


def test_a_negative_tail_is_an_error_not_a_kl_clipped_to_zero():
    ref = np.log(np.array([[0.6, 0.3, 0.05]]))
    kl = kl_tail_bucket(ref, ref)[0]
    assert kl.tolist() == [0.0]
    with pytest.raises(HarnessError, match=r"target's known probabilities of a top-N row sum to 148.7.*negative "
                                           r"tail"):
        kl_tail_bucket(ref, np.array([[5.0, -1.2, -3.0]]))


def _offline(root, rows, mode=FULL, ids=None, side="reference"):
    writer = CaptureWriter(root, SideInfo(side=side, device="cpu", engine="fake"), {"logprobs": -1}, mode)
    writer.add(0, "p", [1, 2], [0, 1, 2], "x", logprobs=np.asarray(rows, dtype=np.float32), ids=ids)
    return writer.finish(vocab_size=4 if mode == FULL else None, store="fp32")


def test_an_offline_capture_with_a_positive_logprob_is_refused_with_side_and_position(tmp_path):
    good = np.log(np.full((3, 4), 0.25))
    bad = good.copy()
    bad[2, 1] = 5.0
    ref = _offline(tmp_path / "r", good)
    tgt = _offline(tmp_path / "t", bad, side="target")
    with pytest.raises(HarnessError, match=r"target's logprobs at prompt 0, position 2 hold \+5, which no "):
        compare_captures(ref, tgt, aligned=True, eps=0.5, topk=2, snippet_elems=0, tie_margin=0.5)
    topn = _offline(tmp_path / "n", np.log([[0.9, 0.9], [0.5, 0.5], [0.3, 0.3]]), TOPN,
                    np.array([[0, 1], [1, 2], [2, 3]], dtype=np.int32), "target")
    with pytest.raises(HarnessError, match="sum to 1.8.*negative tail"):  # top-N: every value below 0, sum above 1
        compare_captures(ref, topn, aligned=True, eps=0.5, topk=2, snippet_elems=0, tie_margin=0.5)


@pytest.mark.parametrize("bad", [5.0, float("nan"), float("inf")])
def test_a_server_capture_with_impossible_numbers_names_the_side_and_position(tmp_path, bad):
    server = FakeServer(bad_value=bad, bad_from=1)  # the probe's answer is sound; the capture's are not
    info, _ = probe(server)
    prompts = [ServedPrompt(0, "p", (3, 9, 1), (4, 5, 6), "x")]
    with pytest.raises(ServerError, match=r"the target server's logprobs at prompt 0, position 0: a logprob is "
                                          r"(\+5|NaN|\+Infinity)") as err:
        capture_server(endpoint(), info, prompts, max_tokens=3, vocab=server.vocab, store="fp32", settings={},
                       side=side_info("target", info, "float32"), folder=tmp_path / "srv",
                       progress=lambda *a: None, transport=transport(server))
    assert "padded" not in str(err.value) and "caps logprobs" not in str(err.value)


def test_the_probe_reads_its_answer_as_the_capture_will():
    with pytest.raises(ServerError, match=r"probe's prompt_logprobs answer.*a logprob is \+5"):
        probe(FakeServer(bad_value=5.0))


# -- item 8: the probe asks what the capture asks, and advises --------------------------------------------
def test_the_probe_sends_token_ids_and_the_width_the_capture_will_send():
    server = FakeServer()
    info, _ = probe(server)
    assert server.requests[-1]["prompt"] == IDS and server.requests[-1]["prompt_logprobs"] == -1
    assert info.logprobs == -1
    server = FakeServer(prompt_logprobs=False)
    info, _ = probe(server, asked=5)
    assert info.scoring == ECHO and server.requests[-1] | {"echo": True, "logprobs": 5, "prompt": IDS} == \
        server.requests[-1]


def test_llama_cpp_refusals_end_the_probe_with_advice_and_no_retries():
    server = FakeServer(llama_cpp=True)
    with pytest.raises(ServerError) as err:
        probe(server, scoring=ECHO)
    message = str(err.value)
    assert "HTTP 500: 2 validation errors for CreateCompletionRequest" in message
    assert "takes only text prompts" in message and "--server-logprobs 20" in message
    assert len(server.requests) == 4  # asked, then 3 variants; a validation error is never retried
    with pytest.raises(ServerError, match="takes only text prompts") as err:  # prompt_logprobs: ignored, ids refused
        probe(FakeServer(llama_cpp=True))
    assert "--server-logprobs" not in str(err.value)
    with pytest.raises(ServerError, match="takes only text prompts") as err:  # a width it allows
        probe(FakeServer(llama_cpp=True), asked=5, scoring=ECHO)
    assert "--server-logprobs" not in str(err.value)
    with pytest.raises(ServerError, match=r"refuses logprobs -1 \(the full vocabulary\) but gives 20 per position: try --server-logprobs 20") as err:
        probe(FakeServer(llama_cpp=True), prompt="The capital", how="free")  # a reference: text is what it sends
    assert "text prompts" not in str(err.value)


def test_a_server_that_names_tokens_by_text_is_refused_by_the_probe():
    with pytest.raises(ServerError, match="names tokens by their text"):
        probe(FakeServer(llama_cpp=True), prompt="The capital", asked=5, how="free")
    assert GENERATE == "generate"


# -- item 6: the API key ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["sk-abc\ndef", "sk abc", "sk-é", "sk-\x01"])
def test_a_key_no_header_can_carry_is_refused_without_being_shown(monkeypatch, tmp_path, key):
    monkeypatch.setenv("VRE_TEST_KEY", key)
    with pytest.raises(UsageError, match="a character an HTTP header cannot carry") as err:
        read_api_key("VRE_TEST_KEY", None)
    assert err.value.exit_code == EXIT_USAGE and key.strip() not in str(err.value) and "sk" not in str(err.value)
    with pytest.raises(ServerError, match="not shown") as err:
        ServerClient(endpoint(api_key=key))
    assert key not in str(err.value)
    (tmp_path / "key").write_text("sk-ok\u00a0x\n")
    with pytest.raises(UsageError, match="not shown"):
        read_api_key(None, str(tmp_path / "key"))


def test_the_keys_variable_never_reaches_a_worker(monkeypatch, tmp_path):
    from vllm_rbln_exec.pipeline.captures import side_env
    from vllm_rbln_exec.pipeline.context import RunContext
    from vllm_rbln_exec.setup.sides import Side

    monkeypatch.setenv("VRE_TEST_KEY", KEY)
    ctx = RunContext.create(str(tmp_path), None, 10.0)
    ctx.secret_env = frozenset({"VRE_TEST_KEY"})
    side = Side(role="reference", device="cpu", platform="cpu", engine="fake", dtype="float32", checkpoint="m",
                model_name="m", torch_device="cpu")
    env, record = side_env(ctx, side, ctx.profiles["cpu"], None)
    assert "VRE_TEST_KEY" not in env and KEY not in json.dumps(record) and KEY not in json.dumps(env)
    assert "VRE_TEST_KEY" not in ctx.base_env()
