"""`vllm-rbln-exec cache ls|show|clear|export|import` as a subprocess, on small hand-made references."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vllm_rbln_exec.capture.archive import pack_capture, unpack_capture
from vllm_rbln_exec.capture.cache import ReferenceCache, cache_key
from vllm_rbln_exec.capture.store import FULL, CaptureWriter, SideInfo

pytestmark = pytest.mark.plumbing


def make_reference_file(tmp_path, name: str, model: str, seed: int):
    info = SideInfo(side="reference", device="cpu", engine="vllm", platform="cpu", dtype="float32", model=model)
    fields = {"model": model, "weights": f"w{seed}", "tokenizer": "t", "max_tokens": 2, "logprobs": -1,
              "prompts": ["a", "b"], "num_hidden_layers": 2, "engine": "vllm", "platform": "cpu"}
    writer = CaptureWriter(tmp_path / f"{name}-dir", info, {"key_fields": fields}, FULL)
    rng = np.random.default_rng(seed)
    for i, prompt in enumerate(fields["prompts"]):
        writer.add(i, prompt, [1], [2, 3], "x", logprobs=rng.normal(size=(2, 16)).astype(np.float32))
    writer.finish()
    path = tmp_path / f"{name}.tar"
    pack_capture(tmp_path / f"{name}-dir", path)
    return path, cache_key(fields)


@pytest.fixture
def cache_cli(tmp_path):
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200", TERM="dumb")

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "vllm_rbln_exec", "cache", *args, "--cache-dir",
                               str(tmp_path / "cache")], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    return run


def test_import_ls_show_export_clear(tmp_path, cache_cli):
    a, key_a = make_reference_file(tmp_path, "a", "model-a", 0)
    b, key_b = make_reference_file(tmp_path, "b", "model-b", 1)

    assert "no cached references" in cache_cli("ls").stdout
    p = cache_cli("import", str(a), str(b))
    assert p.returncode == 0, p.stderr
    assert key_a[:12] in p.stdout and key_b[:12] in p.stdout

    listing = cache_cli("ls").stdout
    assert "2 cached reference(s)" in listing and "model-a" in listing and "model-b" in listing

    shown = cache_cli("show", key_a[:8])
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["fields"]["model"] == "model-a"

    out = tmp_path / "exported.tar"
    assert cache_cli("export", key_b[:10], str(out)).returncode == 0
    back = unpack_capture(out, tmp_path / "back")
    orig = unpack_capture(b, tmp_path / "orig")
    for i in range(2):
        assert np.array_equal(back.logprobs(i), orig.logprobs(i))
    assert back.settings["key_fields"]["model"] == "model-b"

    # clearing needs --yes; without it nothing is lost
    refused = cache_cli("clear")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert "2 cached reference(s)" in cache_cli("ls").stdout
    # a typo among the keys deletes nothing
    assert cache_cli("clear", key_a[:12], "zzzz", "--yes").returncode == 2
    assert "2 cached reference(s)" in cache_cli("ls").stdout
    assert cache_cli("clear", key_a[:12], "--yes").returncode == 0
    with ReferenceCache(tmp_path / "cache" / "references") as cache:
        assert key_a not in cache and key_b in cache
    assert "deleted 1" in cache_cli("clear", "--yes").stdout
    assert "no cached references" in cache_cli("ls").stdout


def test_bad_input_gives_exit_2(tmp_path, cache_cli):
    assert cache_cli("show", "abc").returncode == 2
    assert cache_cli("export", "abc", str(tmp_path / "x.tar")).returncode == 2
    assert cache_cli("import", str(tmp_path / "missing.tar")).returncode == 2
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all")
    p = cache_cli("import", str(junk))
    assert p.returncode == 2 and "junk.tar" in p.stderr
    # a capture without key fields is not a reference
    info = SideInfo(side="target", device="cpu", engine="vllm", platform="cpu", dtype="float32", model="m")
    w = CaptureWriter(tmp_path / "t", info, {}, FULL)
    w.add(0, "a", [1], [2], "x", logprobs=np.zeros((1, 4), dtype=np.float32))
    w.finish()
    pack_capture(tmp_path / "t", tmp_path / "t.tar")
    p = cache_cli("import", str(tmp_path / "t.tar"))
    assert p.returncode == 2 and "key fields" in p.stderr
