"""The typed, versioned records that cross into a worker process, and back out of it.

The parent builds a ``WorkerTask`` (a task name, its folder and a typed payload:
``CaptureRequest`` built from a ``Side``, ``HiddenRequest`` (hidden states for a
localisation), ``CorpusRequest`` (prompt logprobs over corpus windows) or ``ConvertRequest``), writes it as
JSON, and the child reads it back through the same types (``read_task``); a
file of another schema version, or with unknown or missing fields, is refused
before any engine starts. This module owns those records only: it must not
spawn processes, build engines or import torch or vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.records import RecordError, from_data, to_data
from ..profiling.request import ProfileRequest
from .sides import Side

REQUEST_SCHEMA_VERSION = 3  # 2: the hidden_states task; 3: the corpus task
CAPTURE, CONVERT, HIDDEN, CORPUS = "capture", "convert_gguf", "hidden_states", "corpus"


@dataclass(frozen=True)
class CaptureRequest:
    """Capture greedy logprobs of ``prompts`` on ``side``; ``force`` feeds the reference's tokens (teacher forcing)."""

    side: Side
    prompts: tuple[str, ...]
    max_tokens: int
    batch: int
    max_model_len: int
    logprobs: int  # -1: the full vocabulary
    capture: str  # fast | api | plain (plain: the benchmark's baseline, tokens only)
    store: str
    max_batched: int | None = None
    max_logprobs_cap: int | None = None
    trust_remote_code: bool = False
    model_fingerprint: str = ""
    tokenizer_fingerprint: str = ""
    env_record: dict[str, Any] = field(default_factory=dict, hash=False)
    settings: dict[str, Any] = field(default_factory=dict, hash=False)  # recorded in capture.json
    profile: ProfileRequest | None = None
    force: tuple[tuple[int, ...], ...] | None = None
    seed: int = 0


@dataclass(frozen=True)
class HiddenRequest:
    """Hidden states of ``capture.side`` at chosen generated positions (a localisation pass).

    ``capture`` says what to run: its prompts, ``force`` (the reference's tokens, fed as in the run)
    and ``max_tokens`` (one past the last position asked). ``positions[i]``: the generated positions of
    prompt ``i`` to record (0 is the prefill's last token, ``t`` the decode step that produces row ``t``).
    ``modules``: attention and MLP outputs too, besides each layer's output."""

    capture: CaptureRequest
    positions: tuple[tuple[int, ...], ...]
    modules: bool = False


@dataclass(frozen=True)
class CorpusRequest:
    """Prompt logprobs of ``capture.side`` over corpus windows (``setup.corpus``): each window is fed whole as
    one prompt (its forward pass, the prefill) and the full-vocabulary rows that predict its last ``scored``
    tokens are kept, one capture record per window (context ids as the prompt, the scored ids as tokens).
    ``capture`` carries the side, the model length and the store; its prompts are the windows' labels."""

    capture: CaptureRequest
    windows: tuple[tuple[int, ...], ...]
    scored: int
    vocab_size: int  # the width of every row (the model config's vocab_size)


@dataclass(frozen=True)
class ConvertRequest:
    """Turn a GGUF file into a model folder at ``dest`` (once; the folder lock makes concurrent runs wait)."""

    gguf_file: str
    dest: str
    assembler: str | None = None  # a module whose assemble(gguf_file) writes the GGUF first (removed after)


@dataclass(frozen=True)
class WorkerTask:
    task: str  # capture | convert_gguf | hidden_states | corpus
    label: str  # the side or job name shown in messages
    folder: str
    capture: CaptureRequest | None = None
    convert: ConvertRequest | None = None
    hidden: HiddenRequest | None = None
    corpus: CorpusRequest | None = None
    schema_version: int = REQUEST_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return to_data(self)


def capture_task(label: str, folder: Path | str, request: CaptureRequest) -> WorkerTask:
    return WorkerTask(task=CAPTURE, label=label, folder=str(folder), capture=request)


def hidden_task(label: str, folder: Path | str, request: HiddenRequest) -> WorkerTask:
    return WorkerTask(task=HIDDEN, label=label, folder=str(folder), hidden=request)


def corpus_task(label: str, folder: Path | str, request: CorpusRequest) -> WorkerTask:
    return WorkerTask(task=CORPUS, label=label, folder=str(folder), corpus=request)


def convert_task(folder: Path | str, request: ConvertRequest) -> WorkerTask:
    return WorkerTask(task=CONVERT, label="model-conversion", folder=str(folder), convert=request)


def read_task(path: Path) -> WorkerTask:
    """The task file a worker was started with; RecordError when it is not one this version can run."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"cannot read the worker request {path}: {exc}") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != REQUEST_SCHEMA_VERSION:
        raise RecordError(f"worker request {path} has schema version {version!r}, this worker reads "
                          f"{REQUEST_SCHEMA_VERSION}: the parent and the worker come from different installs")
    task = from_data(WorkerTask, data)
    payload = {CAPTURE: task.capture, CONVERT: task.convert, HIDDEN: task.hidden, CORPUS: task.corpus}
    if task.task not in payload or payload[task.task] is None:
        raise RecordError(f"worker request {path}: task {task.task!r} without its payload")
    return task
