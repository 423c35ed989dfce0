"""The server side's HTTP client, probe and capture (``remote``) against a fake vLLM-like server.

The fake (tests/fakes/server.py) is an ``httpx.MockTransport`` handler answering in vLLM 0.32's formats, with
a small numpy "model", so the rows a capture must hold are known exactly. Retries sleep through a recorder,
never for real.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import pytest
from tests.fakes.server import MODEL, FakeServer, transport

from vllm_rbln_exec.capture.store import FULL, TOPN, CaptureWriter, SideInfo, load_capture
from vllm_rbln_exec.compare.captures import compare_captures
from vllm_rbln_exec.core.errors import EXIT_HARNESS
from vllm_rbln_exec.remote.capture import ServedPrompt, bar, capture_server, side_info
from vllm_rbln_exec.remote.client import Endpoint, ServerClient, ServerError, backoff_s, logprobs_cap
from vllm_rbln_exec.remote.probe import ECHO, GENERATE, PROMPT_LOGPROBS, probe_logprobs, probe_server

URL = "http://fake:8000/v1"
KEY = "sk-not-a-real-key-0123"


def endpoint(**kw) -> Endpoint:
    return Endpoint(base=URL, **{"retries": 3, "read_timeout": 30.0, "concurrency": 2, **kw})


def run(coro):
    return asyncio.run(coro)


async def _probe(server: FakeServer, asked: int = -1, scoring: str = "auto", how: str = "forced", **kw):
    sleeps: list[float] = []

    async def sleep(s):
        sleeps.append(s)

    async with ServerClient(endpoint(**kw), transport(server), sleep=sleep) as client:
        info = await probe_server(client, None)
        await probe_logprobs(client, info, "The capital", asked, scoring, how)
        return info, client.traffic, sleeps


# -- the client: retries, backoff, errors, the key ------------------------------------------------------
def test_retries_on_429_and_5xx_with_backoff_then_succeeds():
    server = FakeServer(failures=[429, 503, 500])
    info, traffic, sleeps = run(_probe(server))
    assert info.model == MODEL and traffic.retries == 3
    assert len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2]  # doubling, jitter at most +50 %
    assert all(0.5 * 2 ** i <= s <= 0.75 * 2 ** i for i, s in enumerate(sleeps))


def test_retry_after_is_honoured():
    server = FakeServer(failures=[429], retry_after="7")
    _, _, sleeps = run(_probe(server))
    assert sleeps == [7.0]
    assert backoff_s(0, "not-a-number") <= 0.75 and backoff_s(20) <= 30.0 * 1.5


def test_retries_exhausted_is_a_clear_error_with_the_servers_message():
    server = FakeServer(failures=[503] * 10)
    with pytest.raises(ServerError, match=r"HTTP 503: busy \(503\)") as err:
        run(_probe(server, retries=2))
    assert err.value.exit_code == EXIT_HARNESS


def test_unreachable_server_fails_at_once_without_retries():
    calls = []

    def refuse(request):
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    async def go():
        async with ServerClient(endpoint(), httpx.MockTransport(refuse)) as client:
            await probe_server(client, None)

    with pytest.raises(ServerError, match="cannot reach the server at http://fake:8000/v1/models"):
        run(go())
    assert len(calls) == 1


def test_api_key_goes_in_the_header_only():
    server = FakeServer(api_key=KEY)
    run(_probe(server, api_key=KEY))
    assert server.headers_seen[0]["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(endpoint(api_key=KEY))
    with pytest.raises(ServerError, match="wants an API key") as err:
        run(_probe(FakeServer(api_key=KEY)))
    assert KEY not in str(err.value)


# -- the probe: model, version, how logprobs come back, the cap -----------------------------------------
def test_probe_records_model_version_and_headers():
    info, _, _ = run(_probe(FakeServer()))
    assert (info.model, info.version, info.software) == (MODEL, "0.32.0", "vLLM 0.32.0")
    assert info.model_record["root"] == "/models/fake" and info.headers == {"server": "uvicorn"}
    assert (info.scoring, info.logprobs, info.notes) == (PROMPT_LOGPROBS, -1, [])


def test_probe_names_a_missing_model():
    async def go():
        async with ServerClient(endpoint(), transport(FakeServer())) as client:
            await probe_server(client, "other/model")

    with pytest.raises(ServerError, match="does not serve 'other/model'; it lists: fake/model"):
        run(go())


def test_a_refusal_naming_the_limit_turns_full_rows_into_top_n_with_a_note():
    info, _, _ = run(_probe(FakeServer(max_logprobs=20 // 4)))  # vocab 40, limit 5
    assert info.logprobs == 5 and info.asked_logprobs == -1
    assert "at most 5 logprobs" in info.notes[0] and "--max-logprobs -1" in info.notes[0]


def test_prompt_logprobs_ignored_falls_back_to_echo_and_free_mode_generates():
    info, _, _ = run(_probe(FakeServer(prompt_logprobs=False)))
    assert info.scoring == ECHO
    with pytest.raises(ServerError, match="returned no prompt logprobs"):
        run(_probe(FakeServer(prompt_logprobs=False), scoring=PROMPT_LOGPROBS))
    with pytest.raises(ServerError, match="generated tokens' only.*--align free"):  # echo ignored: never scored
        run(_probe(FakeServer(prompt_logprobs=False, echo=False)))
    info, _, _ = run(_probe(FakeServer(), how="free"))
    assert info.scoring == GENERATE


def test_cap_messages():
    assert logprobs_cap("Requested prompt logprobs of 49152, which is greater than max allowed: 20") == 20
    assert logprobs_cap("logprobs must be at most 5") == 5
    assert logprobs_cap("model not found") is None


# -- the capture: rows as the store keeps them ----------------------------------------------------------
def offline_reference(server: FakeServer, prompts: list[list[int]], tokens: int, root):
    """What a worker would capture of the fake's model: greedy, full rows at every generated position."""
    writer = CaptureWriter(root, SideInfo(side="reference", device="cpu", engine="fake"), {"logprobs": -1}, FULL)
    for i, ids in enumerate(prompts):
        context, rows, out = list(ids), [], []
        for _ in range(tokens):
            row = server.row(context)
            rows.append(row)
            out.append(int(np.argmax(row)))
            context.append(out[-1])
        writer.add(i, f"prompt {i}", ids, out, "x", logprobs=np.asarray(rows, dtype=np.float32))
    return writer.finish(store="fp32")


def served(server: FakeServer, reference, folder, asked=-1, scoring="auto", how="forced", **kw):
    info, _, _ = run(_probe(server, asked, scoring, how))
    prompts = [ServedPrompt(i, r.prompt, tuple(r.prompt_token_ids),
                            tuple(r.token_ids) if how == "forced" else None, r.text)
               for i, r in enumerate(reference.prompts)]
    events = []
    capture = capture_server(endpoint(**kw), info, prompts, max_tokens=4, vocab=server.vocab, store="fp32",
                             settings={"max_tokens": 4}, side=side_info("target", info, "float32"), folder=folder,
                             progress=lambda *a: events.append(a), transport=transport(server))
    return load_capture(capture.root, verify_arrays=True), events, info


@pytest.mark.parametrize("scoring", [PROMPT_LOGPROBS, ECHO])
def test_teacher_forced_full_rows_equal_the_models_rows(tmp_path, scoring):
    server = FakeServer()
    reference = offline_reference(server, [[3, 9, 1], [5, 2]], 4, tmp_path / "ref")
    capture, events, info = served(server, reference, tmp_path / "srv", scoring=scoring)
    assert capture.mode == FULL and capture.vocab_size == server.vocab
    assert capture.info.engine_version == "vLLM 0.32.0" and capture.settings["server"]["scoring"] == scoring
    for i, record in enumerate(capture.prompts):
        assert record.token_ids == reference.prompts[i].token_ids
        np.testing.assert_array_equal(capture.logprobs(i), reference.logprobs(i))
    body = server.requests[-1]
    assert body["prompt"] == reference.prompts[1].prompt_token_ids + reference.prompts[1].token_ids
    assert events[-1][2] == {"stage": "generate", "done": 2, "total": 2} and "[####" in events[-1][1]
    comps = compare_captures(reference, capture, aligned=True, eps=0.5, topk=5, snippet_elems=0, tie_margin=0.5)
    assert all(c.distribution["kl_max"] == 0.0 and c.top1_match == 1.0 for c in comps)


def test_top_n_rows_keep_the_fed_token_and_compare_as_bounds(tmp_path):
    server = FakeServer()
    reference = offline_reference(server, [[3, 9, 1]], 4, tmp_path / "ref")
    capture, _, _ = served(server, reference, tmp_path / "srv", asked=3)
    assert capture.mode == TOPN and capture.settings["logprobs"] == 3
    vals, ids = capture.logprobs(0), capture.top_ids(0)
    assert vals.shape == (4, 4) and (ids[:, 3] == reference.prompts[0].token_ids).all()
    comps = compare_captures(reference, capture, aligned=True, eps=0.5, topk=5, snippet_elems=0, tie_margin=0.5)
    assert comps[0].top1_match == 1.0 and comps[0].distribution["kl_max"] == 0.0  # same model: the bound is 0
    assert comps[0].distribution["renormalized_target"] == 0 and comps[0].max_abs_diff == 0.0


def test_free_running_generation_with_logprobs(tmp_path):
    server = FakeServer()
    reference = offline_reference(server, [[3, 9, 1]], 4, tmp_path / "ref")
    capture, _, _ = served(server, reference, tmp_path / "srv", how="free")
    assert capture.prompts[0].token_ids == reference.prompts[0].token_ids
    np.testing.assert_array_equal(capture.logprobs(0), reference.logprobs(0))
    assert server.requests[-1]["ignore_eos"] is True and server.requests[-1]["max_tokens"] == 4


def test_a_silent_cap_is_exit_3_with_the_way_out(tmp_path):
    server = FakeServer(silent_cap=5)
    reference = offline_reference(server, [[3, 9, 1]], 2, tmp_path / "ref")
    with pytest.raises(ServerError, match=r"returned 5 logprobs .* full vocabulary is 40.*--server-logprobs 5"):
        served(server, reference, tmp_path / "srv")


def test_text_progress_bar():
    assert bar(0, 4, 8) == "[--------]" and bar(2, 4, 8) == "[####----]" and bar(4, 4, 8) == "[########]"
    assert math.isclose(len(bar(1, 3)), 22)
