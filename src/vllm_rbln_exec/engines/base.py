"""The engine contract every backend implements (runs inside a worker only).

An engine is built from the worker's typed ``CaptureRequest``, started once, asked to
capture greedy logprobs for a list of prompts into a ``CaptureWriter``, and
closed. ``force`` (one token list per prompt) feeds the target the reference's
tokens step by step instead of its own argmax (teacher forcing). ``score_windows``
is the corpus task's: each window's prompt logprobs from one forward pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from typing import Any

from ..capture.store import CaptureWriter
from ..setup.request import CaptureRequest

Emit = Callable[..., None]


class Engine(ABC):
    name = "engine"
    hidden_pass = False  # set before start(): a localisation pass (vLLM: eager, one sequence, no prefix cache)

    def __init__(self, request: CaptureRequest, emit: Emit):
        self.request = request
        self.emit = emit

    @abstractmethod
    def start(self) -> None:
        """Load the model; afterwards ``platform()`` is known."""

    @abstractmethod
    def platform(self) -> str:
        """The platform the engine actually runs on: vLLM's device type, a vLLM plugin's entry-point name, or
        torch's device type; the worker checks it against the side's ``platform``."""

    def platform_before_start(self) -> str | None:
        """``platform()`` before ``start()``, where the engine can know it without loading the model (None)."""
        return None

    def platform_note(self) -> str:
        """Where the platform came from, for the message of a platform mismatch ("" when nothing to add)."""
        return ""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Engine and torch versions."""

    @abstractmethod
    def tokenizer_vocab_size(self) -> int:
        """Number of tokens the tokenizer knows, added tokens included."""

    @abstractmethod
    def generate_greedy_logprobs(
        self,
        prompts: list[str],
        writer: CaptureWriter,
        force: list[list[int]] | None = None,
    ) -> None:
        """Greedy generation of ``max_tokens`` per prompt, EOS ignored, with logprobs
        at every generated position written to ``writer`` in prompt order."""

    def effective_settings(self) -> dict[str, Any]:
        """What decides this side's numbers beyond its dtype (recorded in the capture and the report).

        The default reads torch's float32 matmul settings, which engines in this process obey."""
        import torch

        out: dict[str, Any] = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
        if torch.cuda.is_available():
            out["cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
            out["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
            out["gpu"] = torch.cuda.get_device_name(0)
        return out

    corpus_pass = False  # set before start(): a corpus pass (vLLM: one window per step, each prefilled whole)

    def score_windows(self, windows: list[list[int]], scored: int, writer: CaptureWriter,
                      skip: Collection[int], labels: list[str], done: Callable[[int], None]) -> dict[str, Any]:
        """For each window not in ``skip``: one forward pass over its ids (the prefill), and the full-vocabulary
        logprob rows that predict its last ``scored`` tokens written as record ``i`` of ``writer`` (its context
        ids as the prompt, the scored ids as the tokens, ``labels[i]`` as the prompt text); then ``done(i)``.
        Returns what decided how the rows were taken (recorded in the capture's settings)."""
        raise NotImplementedError(f"the {self.name} engine cannot score corpus windows")

    def capture_hidden(self, prompts: list[str], force: list[list[int]], positions: list[list[int]],
                       modules: bool) -> tuple[list[str], dict[int, dict[str, Any]], dict[str, Any]]:
        """Hidden states at the generated ``positions`` of each prompt, teacher-forced on ``force``
        (``engines.hidden_hooks`` names the modules): (names in model order, rows[prompt][name]
        as float32 [positions, width], what decided how they were taken)."""
        raise NotImplementedError(f"the {self.name} engine cannot capture hidden states")

    # Profiling: ``request.profile`` (a ``ProfileRequest``)
    # says where traces go. This default runs torch.profiler in the worker's own
    # process, right for engines that compute here; an engine whose model runs
    # elsewhere (vLLM's engine core) overrides both.
    def start_profile(self) -> None:
        from ..profiling.session import TorchProfileSession

        self._profile_session = TorchProfileSession(self.request.profile, self.request.side.torch_device)
        self._profile_session.start()

    def stop_profile(self) -> None:
        session = getattr(self, "_profile_session", None)
        if session is not None:
            self._profile_session = None
            session.stop()

    def close(self) -> None:
        pass
