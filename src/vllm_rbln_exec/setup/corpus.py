"""The text of a ``corpus`` run, its tokens and the windows that are scored, decided before any engine starts.

Owns where the text comes from (the built-in text shipped with the package, or the user's ``--corpus FILE``),
tokenizing it once in the main process with the model folder's ``tokenizer.json`` (the ``tokenizers``
library, no torch), and cutting the token stream into windows. Every side then receives the same token ids,
so no engine's tokenizer can move the numbers. It must not start workers or import torch or vLLM.

Windows (llama.cpp's perplexity and KL-divergence tools score the second half of each chunk; this is the
same rule with a free stride): a window is the tokenizer's own prefix for any text (BOS, where the model
has one; nothing for SmolLM2) followed by ``window - len(prefix)`` tokens of the corpus. Window ``k`` starts
``k * stride`` tokens into the corpus and scores its last ``min(stride, window - 1)`` tokens, each predicted
from everything before it in the window. With ``stride <= window - len(prefix)`` the scored spans tile the
corpus after the first window's context without overlap, and every scored token has at least
``window - stride`` tokens of context.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import HarnessError, UsageError
from .prompts import read_text_file

BUILTIN = "builtin"
BUILTIN_FILE = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"


@dataclass(frozen=True)
class Window:
    index: int
    start: int  # offset of the window's first corpus token in the corpus's token stream
    ids: tuple[int, ...]  # prefix + corpus tokens
    scored: int  # the last ``scored`` tokens are scored

    @property
    def context(self) -> tuple[int, ...]:
        return self.ids[: len(self.ids) - self.scored]

    @property
    def targets(self) -> tuple[int, ...]:
        return self.ids[len(self.ids) - self.scored:]

    def label(self) -> str:
        return f"window {self.index} @ token {self.start}"


@dataclass(frozen=True)
class CorpusPlan:
    """The corpus as every side sees it: where it came from, its size, the windows kept."""

    source: str  # "builtin" or the file's path
    text_sha256: str
    corpus_tokens: int  # tokens in the whole text (no prefix)
    available_windows: int  # windows the text holds; ``windows`` keeps the first --max-windows of them
    prefix: tuple[int, ...]
    window: int
    stride: int
    windows: tuple[Window, ...]

    def digest(self) -> str:
        """A hash of exactly what the engines are fed: the windows' ids and how many tokens each scores."""
        blob = json.dumps([[list(w.ids), w.scored] for w in self.windows], separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    @property
    def scored_tokens(self) -> int:
        return sum(w.scored for w in self.windows)

    def to_json(self) -> dict:
        return {"source": self.source, "text_sha256": self.text_sha256, "corpus_tokens": self.corpus_tokens,
                "available_windows": self.available_windows, "windows": len(self.windows),
                "prefix": list(self.prefix), "window": self.window, "stride": self.stride,
                "scored_per_window": self.windows[0].scored if self.windows else 0,
                "scored_tokens": self.scored_tokens, "digest": self.digest()}


def read_corpus_text(source: str) -> tuple[str, str]:
    """(what to call it, its text): ``builtin`` or a UTF-8 text file; UsageError for anything else."""
    if source == BUILTIN:
        return BUILTIN, BUILTIN_FILE.read_text(encoding="utf-8")
    path = Path(source).expanduser()
    text = read_text_file(path, "--corpus", "--corpus")
    if not text.strip():
        raise UsageError(f"--corpus {path} holds no text", option="--corpus")
    return str(path), text


def tokenize(text: str, model_path: Path) -> tuple[list[int], list[int]]:
    """(the text's token ids without special tokens, the ids the tokenizer puts before any text)."""
    path = Path(model_path) / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise HarnessError("the corpus is tokenized with the `tokenizers` library (a dependency of transformers), "
                           "which is not installed here") from exc
    if not path.is_file():
        raise UsageError(f"{model_path} has no tokenizer.json: the corpus cannot be tokenized before the engines "
                         "start", option="--model")
    tokenizer = Tokenizer.from_file(str(path))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    prefix = tokenizer.encode("", add_special_tokens=True).ids
    return [int(t) for t in ids], [int(t) for t in prefix]


def cut_windows(ids: list[int], prefix: list[int], window: int, stride: int) -> list[Window]:
    """Every window the token stream holds (module docstring); UsageError for settings that cannot work."""
    body = window - len(prefix)
    if window < 2 or body < 1:
        raise UsageError(f"--window {window} is too short (at least 2 tokens, and more than the {len(prefix)} "
                         "token(s) the tokenizer puts first)", option="--window")
    if stride < 1 or stride > body:
        raise UsageError(f"--stride {stride} must be between 1 and the window's {body} corpus tokens (a longer "
                         "stride would skip text)", option="--stride")
    if len(ids) < body:
        raise UsageError(f"the corpus has {len(ids)} tokens, fewer than one window of {body}: give a longer "
                         "text or a shorter --window", option="--corpus")
    scored = min(stride, window - 1)
    return [Window(k, start, tuple(prefix) + tuple(ids[start:start + body]), scored)
            for k, start in enumerate(range(0, len(ids) - body + 1, stride))]


def plan_corpus(source: str, model_path: Path, window: int, stride: int, max_windows: int | None,
                max_positions: int | None = None) -> CorpusPlan:
    """The windows every side is fed; ``max_positions``: the model's context length, which a window (and the one
    token generated after it) must fit."""
    if max_positions and window + 1 > max_positions:
        raise UsageError(f"--window {window} does not fit the model's {max_positions} positions (the window and one "
                         "token after it)", option="--window")
    name, text = read_corpus_text(source)
    ids, prefix = tokenize(text, model_path)
    windows = cut_windows(ids, prefix, window, stride)
    kept = windows[:max_windows] if max_windows else windows
    return CorpusPlan(source=name, text_sha256=hashlib.sha256(text.encode()).hexdigest()[:24],
                      corpus_tokens=len(ids), available_windows=len(windows), prefix=tuple(prefix), window=window,
                      stride=stride, windows=tuple(kept))
