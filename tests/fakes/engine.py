"""A deterministic numpy-only engine for plumbing tests (spawning, timeouts, crashes, caching, the pipeline).

Registered in tests only: ``VLLM_RBLN_EXEC_ENGINES="fake=tests.fakes.engine:FakeEngine"``.
It implements the same contract as ``engines/base.py`` and writes rows into the
``CaptureWriter`` exactly as the transformers engine does (preallocated
memory-mapped rows, full vocabulary or top-N, ``add`` per prompt, timings).

Model: the folder ``tests.fakes.model.make_fake_model`` writes. The vocabulary
comes from its ``config.json``; a byte-level tokenizer of its own maps each
UTF-8 byte ``b`` to token ``b % (vocab - 1)`` and puts BOS (``vocab - 1``) first.
The logits of a step are a seeded function of the whole context (prompt ids and
the tokens fed so far): standard normals scaled by ``SCALE`` from a generator
seeded with a hash of (config seed, layer count, context), plus the weights'
``lm_head.bias``. Same folder, same prompts: bitwise the same rows, on any side.
Teacher forcing works as in the real engines: ``force`` feeds the given tokens,
so later rows follow the reference's context.

Behaviour switches (environment variables; the worker inherits them):

  VRE_FAKE_SIDES     comma list of sides the switches below act on (default: all).
                     "target" also matches its repeats ("target-r2", ...).
  VRE_FAKE_SHIFT     AMOUNT or AMOUNT@PROMPT:POSITION: add AMOUNT nats to the logit
                     of each row's runner-up token (at every position, or at that one)
  VRE_FAKE_CRASH     start | generate: raise (the worker reports the error);
                     kill: SIGKILL itself mid-generation (no result at all);
                     missing_op: raise at generate what torch raises for an operator its kernel
                     library lacks (vLLM 0.32's AVX2 build and W4A16, issue 25).
                     Mid-generation is prompt 0, position 1, after a row was written
                     (a corpus pass: before its second window, after the first was written).
  VRE_FAKE_HANG      start | generate: sleep VRE_FAKE_HANG_S seconds (default 3600)
  VRE_FAKE_PLATFORM  the platform platform() reports
  VRE_FAKE_DELAY     seconds to sleep per generated token
  VRE_FAKE_CHILD     1: start() launches a sleeping child process, as vLLM launches
                     its engine core; it dies only if the worker's group is ended

Every switch that fires prints a line starting with ``fake engine:`` first, so a
log tail shows what happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tests.fakes.model import ARCHITECTURE
from tests.fakes.tensorfile import read_safetensors

from vllm_rbln_exec.capture.store import CaptureWriter
from vllm_rbln_exec.engines.base import Engine

SCALE = 3.0
ENV_PREFIX = "VRE_FAKE_"


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


class FakeEngine(Engine):
    name = "fake"

    # -- switches ---------------------------------------------------------------
    def switch(self, name: str) -> str | None:
        """The value of ``VRE_FAKE_<name>`` when it applies to this worker's side, else None."""
        sides = [s.strip() for s in os.environ.get(ENV_PREFIX + "SIDES", "").split(",") if s.strip()]
        side = self.request.side.role
        if sides and not any(side == s or side.startswith(s + "-") for s in sides):
            return None
        value = os.environ.get(ENV_PREFIX + name)
        return value if value else None

    def _announce(self, what: str) -> None:
        print(f"fake engine: {what} (side {self.request.side.role})", flush=True)

    def _maybe_fail(self, stage: str) -> None:
        crash = self.switch("CRASH")
        if crash == stage:
            self._announce(f"crashing at {stage} as VRE_FAKE_CRASH asks")
            raise RuntimeError(f"fake engine crashed at {stage} (VRE_FAKE_CRASH={crash})")
        if crash == "missing_op" and stage == "generate":
            self._announce("calling a kernel the library lacks as VRE_FAKE_CRASH asks")
            raise AttributeError("'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'")
        if crash == "kill" and stage == "generate":
            self._announce("killing itself with SIGKILL as VRE_FAKE_CRASH asks")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.switch("HANG") == stage:
            seconds = float(os.environ.get(ENV_PREFIX + "HANG_S") or 3600)
            self._announce(f"hanging at {stage} for {seconds:g} s as VRE_FAKE_HANG asks")
            time.sleep(seconds)

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        model = Path(self.request.side.checkpoint)
        config = json.loads((model / "config.json").read_text())
        archs = config.get("architectures") or []
        if archs != [ARCHITECTURE]:
            raise ValueError(f"the fake engine loads {ARCHITECTURE} only, not {archs}")
        self.vocab = int(config["vocab_size"])
        if self.vocab < 2:
            raise ValueError(f"vocab_size {self.vocab} is too small")
        self.bos = self.vocab - 1
        self.layers = int(config.get("num_hidden_layers", 0))
        self.seed = int(config.get("fake_seed", 0))
        weights = model / "model.safetensors"
        self.bias = np.zeros(self.vocab)
        if weights.is_file():
            bias = read_safetensors(weights).get("lm_head.bias")
            if bias is not None:
                if bias.shape != (self.vocab,):
                    raise ValueError(f"lm_head.bias has shape {bias.shape}, not ({self.vocab},)")
                self.bias = bias.astype(np.float64)
        self.child = None
        if self.switch("CHILD"):
            # like vLLM's engine core: a process of its own in the worker's group
            self.child = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(3600)", "fake-engine-child",
                 os.getcwd()],  # the worker runs in its own folder, which names the run
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._announce(f"started child process {self.child.pid}")
        self._maybe_fail("start")

    def platform(self) -> str:
        wrong = self.switch("PLATFORM")
        if wrong:
            self._announce(f"reporting platform {wrong!r} as VRE_FAKE_PLATFORM asks")
            return wrong
        return str(self.request.side.torch_device or "cpu").split(":")[0]

    def versions(self) -> dict[str, str]:
        return {"engine_version": "fake-1", "torch_version": ""}

    def effective_settings(self) -> dict[str, object]:
        return {"engine": "fake"}  # the default reads torch's matmul settings; there is no torch here

    def tokenizer_vocab_size(self) -> int:
        return self.vocab

    def close(self) -> None:
        child = getattr(self, "child", None)
        # a clean close ends the child, as a real engine shuts its core down; a
        # crash or a kill leaves it to the parent, which ends the whole group
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait(timeout=10)

    # profiling: there is nothing to profile; the default would import torch
    def start_profile(self) -> None:
        Path(self.request.profile.dir).mkdir(parents=True, exist_ok=True)

    def stop_profile(self) -> None:
        pass

    # -- the model ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return [self.bos] + [b % (self.vocab - 1) for b in text.encode("utf-8")]

    def decode(self, tokens: list[int]) -> str:
        return bytes(t for t in tokens if t != self.bos and t < 256).decode("utf-8", errors="replace")

    def logits(self, context: list[int]) -> np.ndarray:
        key = np.asarray([self.seed, self.layers, *context], dtype=np.int64).tobytes()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return np.random.default_rng(seed).standard_normal(self.vocab) * SCALE + self.bias

    def _shift_at(self) -> tuple[float, int | None, int | None] | None:
        value = self.switch("SHIFT")
        if value is None:
            return None
        amount, _, where = value.partition("@")
        if not where:
            return float(amount), None, None
        prompt, _, position = where.partition(":")
        return float(amount), int(prompt), int(position)

    # -- corpus windows ---------------------------------------------------------------
    def score_windows(self, windows, scored, writer, skip, labels, done) -> dict[str, object]:
        """Each scored token's row is the fake's row for the window's tokens before it (the prompt's forward
        pass, as the real engines compute it); VRE_FAKE_SHIFT moves the runner-up as in a capture."""
        shift = self._shift_at()
        todo = [i for i in range(len(windows)) if i not in skip]
        for n, i in enumerate(todo):
            if n == 1:
                self._maybe_fail("generate")
            ids = [int(t) for t in windows[i]]
            lp_path, _ = writer.allocate(i, scored, self.vocab, with_ids=False)
            rows = np.load(lp_path, mmap_mode="r+")
            for r, j in enumerate(range(len(ids) - scored, len(ids))):
                z = self.logits(ids[:j])
                if shift is not None and shift[1] in (None, i) and shift[2] in (None, r):
                    z[int(np.argsort(z, kind="stable")[-2])] += shift[0]
                rows[r] = _log_softmax(z).astype(np.float32)
            rows.flush()
            del rows
            writer.add(i, labels[i], ids[:len(ids) - scored], ids[len(ids) - scored:], "")
            done(i)
            self.emit("corpus", f"{n + 1}/{len(todo)} windows", done=n + 1, total=len(todo))
        return {"prompt_rows": "the fake engine's rows of each window's prefix"}

    # -- capture --------------------------------------------------------------------
    def generate_greedy_logprobs(
        self,
        prompts: list[str],
        writer: CaptureWriter,
        force: list[list[int]] | None = None,
    ) -> None:
        total = len(prompts)
        for i, prompt in enumerate(prompts):
            forced = None if force is None else [int(t) for t in force[i]]
            self._one(i, prompt, writer, forced)
            self.emit("generate", f"{i + 1}/{total} prompts", done=i + 1, total=total)

    def _one(self, index: int, prompt: str, writer: CaptureWriter, forced: list[int] | None) -> None:
        r = self.request
        topn = None if int(r.logprobs) == -1 else int(r.logprobs)
        plain = r.capture == "plain"
        if plain and forced is not None:
            raise ValueError("capture 'plain' cannot force tokens (as with vLLM, where it runs no logits processor)")
        max_tokens = int(r.max_tokens)
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        prompt_ids = self.encode(prompt)
        steps = max_tokens
        max_len = r.max_model_len
        if max_len:
            if len(prompt_ids) >= int(max_len):
                raise ValueError(
                    f"prompt {index} has {len(prompt_ids)} tokens, not fewer than max_model_len {max_len}")
            steps = min(max_tokens, int(max_len) - len(prompt_ids))
        shift = self._shift_at()
        delay = float(self.switch("DELAY") or 0)
        context = list(prompt_ids)
        tokens: list[int] = []
        rows = ids = None
        t_start = time.perf_counter()
        writer.add_time("prefill_s", 0.0)
        for t in range(steps):
            if index == 0 and t == 1:
                self._maybe_fail("generate")
            if delay:
                time.sleep(delay)
            z = self.logits(context)
            if shift is not None and shift[1] in (None, index) and shift[2] in (None, t):
                runner_up = int(np.argsort(z, kind="stable")[-2])
                z[runner_up] += shift[0]
            logprobs = _log_softmax(z).astype(np.float32)
            if not plain:
                if rows is None:
                    width = topn or self.vocab
                    lp_path, ids_path = writer.allocate(index, max_tokens, width, with_ids=topn is not None)
                    rows = np.load(lp_path, mmap_mode="r+")
                    ids = np.load(ids_path, mmap_mode="r+") if ids_path is not None else None
                if topn is None:
                    rows[t] = logprobs
                else:
                    top = np.argsort(-logprobs, kind="stable")[:topn]
                    rows[t] = logprobs[top]
                    ids[t] = top.astype(np.int32)
            token = forced[t] if forced is not None and t < len(forced) else int(np.argmax(logprobs))
            tokens.append(token)
            context.append(token)
        writer.add_time("generate_s", time.perf_counter() - t_start)
        for array in (rows, ids):
            if array is not None:
                array.flush()
        del rows, ids
        writer.add(index, prompt, prompt_ids, tokens, self.decode(tokens))
