"""Run settings: one object that the CLI fills and the library reads.

``RunConfig`` holds every option of a parity run, validated here (not in the
CLI) so the library can be driven from Python and from the pytest plugin with
the same checks. It also holds the built-in prompts. No engine code here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UsageError

BUILTIN_PROMPTS = [
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
]

ENGINES = ("vllm", "transformers")
ALIGN_MODES = ("forced", "free")
CAPTURE_MODES = ("fast", "api")
STORES = ("q16", "fp32")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PROFILE_SIDES = ("reference", "target")


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    target: str = "auto"
    max_model_len: int = 2048
    num_hidden_layers: int | None = None
    trust_remote_code: bool = False
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: bool = False
    batch: int = 4
    max_tokens: int = 32
    max_batched: int | None = None
    prompts: list[str] = field(default_factory=list)
    num_prompts: int = 4
    logprobs: int = -1
    max_logprobs_cap: int | None = None
    inspect_logits: bool = True
    topk: int = 5
    block_size_cpu: int = 128
    block_size_rbln: int = 8192
    block: int | None = None
    no_color: bool = False
    no_snippet: bool = False
    snippet_elems: int = 5
    use_cache: bool = False
    require_cache: bool = False  # CI: a missing reference is an error, never recomputed
    profile: bool = False
    profile_side: str | None = None  # reference|target: profile that side only (--profile: both)
    profile_memory: bool = False
    profile_shapes: bool = False
    profile_stack: bool = False
    profile_dir: str = "profile"
    eps: float = 0.5
    # beyond the original tool
    reference_engine: str = "vllm"
    target_engine: str = "vllm"
    reference_dtype: str | None = None
    target_dtype: str | None = None
    reference_device: str | None = None  # torch device of a transformers reference (default: cpu)
    target_device: str | None = None  # torch device of a transformers target (default: the profile's)
    target_model: str | None = None
    align: str = "forced"
    tie_margin: float = 0.5
    capture: str = "fast"
    store: str = "q16"
    # the verdict (see gate/spec/check)
    fail_on: list[str] = field(default_factory=list)
    spec: str | None = None
    no_default_gates: bool = False
    near_ties_fail: bool | None = None
    repeat: int = 1
    json_out: str | None = None
    junit_out: str | None = None
    markdown_out: str | None = None
    reference_file: str | None = None
    save_reference: str | None = None
    devices_file: str | None = None
    cache_dir: str = "cache"
    runs_dir: str = "runs"
    run_dir: str | None = None
    timeout: float = 1800.0
    kv_cache_gib: int | None = None  # whole GiB: vLLM reads VLLM_CPU_KVCACHE_SPACE with int()
    verbose: bool = False
    explicit: list[str] = field(default_factory=list)  # options the user set (not defaults)

    def validate(self) -> RunConfig:
        def positive(name: str, value: int | float | None, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if value is None or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}",
                                 option=f"--{name.replace('_', '-')}")

        for name in ("max_model_len", "tp", "pp", "dp", "batch", "max_tokens", "num_prompts", "topk",
                     "block_size_cpu", "block_size_rbln", "snippet_elems", "repeat"):
            positive(name, getattr(self, name))
        for name in ("num_hidden_layers", "max_batched", "block", "max_logprobs_cap", "kv_cache_gib"):
            positive(name, getattr(self, name), allow_none=True)
        if self.logprobs == 0 or self.logprobs < -1:
            raise UsageError(f"--logprobs must be -1 (full vocabulary) or a positive N, got {self.logprobs}",
                             option="--logprobs")
        if self.max_logprobs_cap is not None and self.logprobs > self.max_logprobs_cap:
            raise UsageError(
                f"--logprobs {self.logprobs} exceeds --max-logprobs-cap {self.max_logprobs_cap}",
                option="--logprobs",
            )
        if not self.eps > 0:
            raise UsageError(f"--eps must be greater than 0, got {self.eps}", option="--eps")
        if self.timeout <= 0:
            raise UsageError("--timeout must be greater than 0", option="--timeout")
        for option, engine in (("--reference-engine", self.reference_engine),
                               ("--target-engine", self.target_engine)):
            if engine not in ENGINES:
                from ..core.registry import suggest

                raise UsageError(suggest("engine", engine, ENGINES), option=option)
        choices = (("--align", self.align, ALIGN_MODES), ("--capture", self.capture, CAPTURE_MODES),
                   ("--store", self.store, STORES),
                   ("--reference-dtype", self.reference_dtype, DTYPES), ("--target-dtype", self.target_dtype, DTYPES))
        for option, value, allowed in choices:
            if value is not None and value not in allowed:
                raise UsageError(f"{option} must be one of {', '.join(allowed)}, got {value!r}", option=option)
        if self.tie_margin < 0:
            raise UsageError("--tie-margin must be 0 or more", option="--tie-margin")
        self.validate_profiling()
        if self.reference_file and not Path(self.reference_file).is_file():
            raise UsageError(f"reference file {self.reference_file} does not exist", option="--reference")
        if self.require_cache:
            self.use_cache = True
        if self.reference_file and self.save_reference:
            raise UsageError("--reference and --save-reference cannot be combined", option="--save-reference")
        for option, value in (("--json", self.json_out), ("--junit", self.junit_out),
                              ("--markdown", self.markdown_out)):
            if value is not None and Path(value).is_dir():
                raise UsageError(f"{option} {value} is a folder; give a file name", option=option)
            blocked = _unwritable_place(Path(value)) if value is not None else None
            if blocked is not None:  # found now, not after a run of many minutes whose verdict it would lose
                raise UsageError(f"{option} {value} cannot be written: {blocked} is not a writable folder",
                                 option=option)
        if self.max_tokens >= self.max_model_len:
            raise UsageError(
                f"--max-tokens {self.max_tokens} leaves no room for the prompt in --max-model-len "
                f"{self.max_model_len}",
                option="--max-tokens",
            )
        return self

    def validate_profiling(self) -> None:
        if self.profile_side is not None and self.profile_side not in PROFILE_SIDES:
            raise UsageError(f"--profile-side must be one of {', '.join(PROFILE_SIDES)}, got {self.profile_side!r}",
                             option="--profile-side")
        if not self.profiled_sides():
            for name in ("profile_memory", "profile_shapes", "profile_stack"):
                if getattr(self, name):
                    option = f"--{name.replace('_', '-')}"
                    raise UsageError(f"{option} needs --profile or --profile-side", option=option)
        if self.profile_side == "reference" and self.reference_file:
            raise UsageError("--profile-side reference: with --reference FILE no reference worker runs",
                             option="--profile-side")
        if getattr(self, "require_cache", False) and "reference" in self.profiled_sides() \
                and not self.reference_file:
            raise UsageError("profiling the reference computes it, which --require-cache forbids; "
                             "use --profile-side target", option="--profile-side" if self.profile_side else "--profile")

    def profiled_sides(self) -> tuple[str, ...]:
        """The sides whose generation runs under the profiler (--profile-side wins over --profile)."""
        if self.profile_side:
            return (self.profile_side,)
        return PROFILE_SIDES if self.profile else ()

    def resolved_prompts(self) -> list[str]:
        """The prompts to run: given ones, else ``num_prompts`` built-ins (cycled)."""
        if self.prompts:
            return list(self.prompts)
        n = self.num_prompts
        return [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] + ("" if i < len(BUILTIN_PROMPTS) else f" (#{i // len(BUILTIN_PROMPTS) + 1})")
                for i in range(n)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: ``.jsonl`` (strings or {"prompt": ...}), ``.json`` list, or one per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"prompts file {p} does not exist", option="--prompts")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
            prompts = [d["prompt"] if isinstance(d, dict) else d for d in data]
        elif p.suffix == ".jsonl":
            prompts = []
            for line in text.splitlines():
                if line.strip():
                    d = json.loads(line)
                    prompts.append(d["prompt"] if isinstance(d, dict) else d)
        else:
            prompts = [line for line in text.splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read prompts from {p}: {exc}", option="--prompts") from exc
    if not prompts or not all(isinstance(x, str) and x for x in prompts):
        raise UsageError(f"{p} holds no prompts (or a non-string one)", option="--prompts")
    return prompts


def _unwritable_place(path: Path) -> Path | None:
    """None if ``path`` could be created (its nearest existing ancestor is a writable folder), else that ancestor."""
    place = path.absolute().parent
    while not place.exists() and place != place.parent:
        place = place.parent
    return None if place.is_dir() and os.access(place, os.W_OK | os.X_OK) else place
