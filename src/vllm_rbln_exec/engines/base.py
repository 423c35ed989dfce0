"""The engine contract every backend implements (runs inside a worker only).

An engine is built from the worker's plain-data request, started once, asked to
capture greedy logprobs for a list of prompts into a ``CaptureWriter``, and
closed. ``force`` (one token list per prompt) feeds the target the reference's
tokens step by step instead of its own argmax (teacher forcing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from ..capture.store import CaptureWriter

Emit = Callable[..., None]


class Engine(ABC):
    name = "engine"

    def __init__(self, request: dict[str, Any], emit: Emit):
        self.request = request
        self.emit = emit

    @abstractmethod
    def start(self) -> None:
        """Load the model; afterwards ``platform()`` is known."""

    @abstractmethod
    def platform(self) -> str:
        """The platform the engine actually runs on (vLLM's device type, or torch's)."""

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

    # Profiling: ``request["profile"]`` ({"dir", "prefix", "memory", "shapes", "stack"})
    # says where traces go. This default runs torch.profiler in the worker's own
    # process, right for engines that compute here; an engine whose model runs
    # elsewhere (vLLM's engine core) overrides both.
    def start_profile(self) -> None:
        from ..profiling.session import TorchProfileSession

        self._profile_session = TorchProfileSession(self.request["profile"], self.request.get("torch_device"))
        self._profile_session.start()

    def stop_profile(self) -> None:
        session = getattr(self, "_profile_session", None)
        if session is not None:
            self._profile_session = None
            session.stop()

    def close(self) -> None:
        pass
