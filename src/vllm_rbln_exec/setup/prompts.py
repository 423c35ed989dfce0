"""Prompts: the built-in set, prompt files, the ``--prompts`` values that name them, and their checks.

Owns reading prompts from files, expanding ``--prompts`` arguments, and
refusing prompts no engine could run (empty ones, ones too long for the model
length) before any engine starts: lengths are counted with the model folder's
``tokenizer.json`` through the ``tokenizers`` library (no torch), the way vLLM
tokenizes (special tokens added). It must not start workers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import UsageError

BUILTIN_PROMPTS = (
    "The capital of France is",
    "Explain in one paragraph why the sky is blue.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Translate to German: The weather is nice today and we are going for a walk.",
    "List three prime numbers greater than one hundred:",
    "Once upon a time, in a village at the edge of a great forest,",
    "Q: What is 17 multiplied by 23?\nA:",
    "The three laws of thermodynamics can be summarised as follows:",
    "Write a haiku about a graphics card running out of memory.",
    "In machine learning, the softmax function",
    "import numpy as np\n\n# compute the mean of each column of a matrix\n",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "The difference between a list and a tuple in Python is",
    "Rebellions, Ascend, Gaudi and CUDA are all names of",
    "A recipe for pancakes needs the following ingredients:",
    "SELECT name, COUNT(*) FROM orders GROUP BY",
)
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def builtin_prompts(n: int) -> list[str]:
    """``n`` built-in prompts; past the sixteenth they repeat with a ``(#k)`` suffix so none is identical."""
    size = len(BUILTIN_PROMPTS)
    return [BUILTIN_PROMPTS[i % size] + ("" if i < size else f" (#{i // size + 1})") for i in range(n)]


def expand_prompt_args(values: list[str] | tuple[str, ...]) -> list[str]:
    """``--prompts`` values: ``@FILE`` or an existing .txt/.json/.jsonl path reads a file, anything else is a prompt."""
    out: list[str] = []
    for value in values:
        if value.startswith("@"):
            out += read_prompts_file(value[1:])
        elif value.endswith(PROMPT_FILE_SUFFIXES) and Path(value).is_file():
            out += read_prompts_file(value)
        else:
            out.append(value)
    return out


def read_text_file(path: Path, what: str, option: str) -> str:
    """A UTF-8 text file's text; UsageError naming ``what`` and the file when it is missing, not UTF-8 or
    unreadable (prompt files, corpora)."""
    if not path.is_file():
        raise UsageError(f"{what} {path}: no such file (give a UTF-8 text file)", option=option)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                         option=option) from exc
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read: {exc}", option=option) from exc


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: ``.jsonl`` (strings or {"prompt": ...}), ``.json`` list, or one per line."""
    p = Path(path).expanduser()
    text = read_text_file(p, "prompts file", "--prompts")
    try:
        prompts = _parse(text, p.suffix)
    except ValueError as exc:
        raise UsageError(f"cannot read prompts from {p}: {exc}", option="--prompts") from exc
    if not prompts:
        raise UsageError(f"{p} holds no prompts", option="--prompts")
    return prompts


def _parse(text: str, suffix: str) -> list[str]:
    if suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list):
            raise ValueError(f"a .json prompts file holds a list, not {type(items).__name__}")
    elif suffix == ".jsonl":
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        return [line for line in text.splitlines() if line.strip()]
    return [_prompt_of(item, i) for i, item in enumerate(items)]


def _prompt_of(item: object, index: int) -> str:
    """A string, or an object's ``prompt`` string; ValueError naming the item otherwise (a number is no prompt)."""
    value = item.get("prompt") if isinstance(item, dict) else item
    if not isinstance(value, str) or not value:
        shown = json.dumps(value)[:40] if value is not None else "missing"
        raise ValueError(f"item {index}: the prompt is {shown}, not a non-empty string "
                         "(give a string, or an object with a \"prompt\" string)")
    return value


def check_not_empty(prompts: list[str] | tuple[str, ...]) -> None:
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise UsageError(f"prompt {i} is {type(prompt).__name__} {str(prompt)[:40]!r}, not text",
                             option="--prompts")
        if not prompt:
            raise UsageError(f"prompt {i} is empty: an engine has nothing to continue", option="--prompts")


def shorten(text: str, width: int = 40) -> str:
    one_line = text.replace("\n", "⏎")
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def prompt_lengths(prompts: list[str] | tuple[str, ...], model_path: Path) -> list[int] | None:
    """Token counts with the model's ``tokenizer.json`` (None: no tokenizer.json or no ``tokenizers`` here)."""
    path = Path(model_path) / "tokenizer.json"
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    except Exception:  # no file, no library, or a format it cannot read: the worker's tokenizer decides
        return None
    return [len(e.ids) for e in tokenizer.encode_batch(list(prompts), add_special_tokens=True)]


def check_prompt_lengths(prompts: list[str] | tuple[str, ...], model_path: Path, max_model_len: int,
                         max_tokens: int) -> None:
    """UsageError for the first prompt that tokenizes to nothing or does not fit with ``max_tokens``."""
    lengths = prompt_lengths(prompts, model_path)
    if lengths is None:
        return
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        if n == 0:
            raise UsageError(f"prompt {i} ({shorten(prompt)!r}) has no tokens", option="--prompts")
        if n + max_tokens > max_model_len:
            raise UsageError(
                f"prompt {i} ({shorten(prompt)!r}) has {n} tokens; with --max-tokens {max_tokens} it needs "
                f"{n + max_tokens}, more than --max-model-len {max_model_len}", option="--prompts")
