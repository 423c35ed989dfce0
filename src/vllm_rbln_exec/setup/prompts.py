"""Prompts: the built-in set, prompt files and the ``--prompts`` values that name them.

Owns reading prompts from files and expanding ``--prompts`` arguments. It must
not tokenize (that needs a model) nor check lengths against an engine.
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


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: ``.jsonl`` (strings or {"prompt": ...}), ``.json`` list, or one per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"prompts file {p} does not exist", option="--prompts")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"prompts file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                         option="--prompts") from exc
    try:
        prompts = _parse(text, p.suffix)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read prompts from {p}: {exc}", option="--prompts") from exc
    if not prompts or not all(isinstance(x, str) and x for x in prompts):
        raise UsageError(f"{p} holds no prompts (or a non-string one)", option="--prompts")
    return prompts


def _parse(text: str, suffix: str) -> list:
    if suffix == ".json":
        return [d["prompt"] if isinstance(d, dict) else d for d in json.loads(text)]
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [d["prompt"] if isinstance(d, dict) else d for d in rows]
    return [line for line in text.splitlines() if line.strip()]
