"""A/B presets (``--ab NAME``): two sides on one device, differing in one engine feature.

One table, ``PRESETS``: each preset names the question it answers, the engine
arguments of each side, the flat options it sets (prompts that exercise the
feature, batch, alignment) and the devices where it cannot run. Its tolerances,
one set per precision tier with the measurements behind them, are the verdict's
(``verdict.presets``): they are chosen when the run's dtypes are known, and a
re-judged saved run gets them again. ``apply_preset`` folds a preset into the
flat options before they are checked, under everything the user gave: the
user's engine arguments win key by key and any option given on the command line
stays as given (a ``--fail-on`` on a preset's metric replaces the preset's
tolerance when the run is judged). The reference runs on the target's device
(``pipeline.sides``). Nothing here starts an engine or imports torch or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.errors import UsageError
from ..core.registry import suggest

# A shared prefix of about 330 tokens (SmolLM2's tokenizer): more than two blocks of the CPU profile's 128,
# so prefix caching has whole blocks to hit (it caches full blocks only).
_PREFIX = (
    "You are a careful assistant for a team that maintains an inference server. The server loads a "
    "language model, keeps a cache of attention keys and values in fixed-size blocks, schedules requests "
    "in steps, and returns the next token of every running request at each step. Requests that share the "
    "beginning of their prompt can reuse the cached blocks of that beginning instead of computing them "
    "again. Long prompts can be split into chunks that are computed over several steps, so that running "
    "requests keep producing tokens while a long prompt is read. Several requests are computed together "
    "in one batch, and the order in which they sit in the batch is decided by the scheduler. The team "
    "wants every one of these choices to leave the answers unchanged, or to know by how much they change "
    "them. When you answer, first restate the question in one sentence, then give the answer in short "
    "numbered steps, then name one thing that could make the answer wrong. Keep every step to one line, "
    "use plain words, and do not repeat the question at the end. The questions come from engineers who "
    "read the logs of the server, and they want answers they can check against those logs. "
)
_SUFFIXES = ("Question: why would a cached block be reused only when it is full?",
             "Question: what happens to a running request while a long prompt is read in chunks?",
             "Question: how can the order of requests in a batch change a result?",
             "Question: which log line shows that a prefix was found in the cache?")
PREFIX_PROMPTS = tuple(_PREFIX + s for s in _SUFFIXES)
# Long prompts (each well over the 64-token chunk of the chunked-prefill preset), no shared beginning.
LONG_PROMPTS = tuple(f"{s} Background for the answer follows. {_PREFIX}" for s in _SUFFIXES)
# Prompt P sits in slots 0 and 2 of the first batch of 4 and in slot 1 of the second; the others differ in length.
_P = "The three laws of thermodynamics, stated simply, are"
BATCH_SLOT_PROMPTS = (_P, "Write a haiku about a cache miss.", _P,
                      "List the planets of the solar system in order of their distance from the sun, with one "
                      "fact about each.", "Translate 'good morning' into French, German and Spanish.", _P)
# Text that repeats itself, so n-gram proposals (prompt lookup) find continuations to draft.
REPEATING_PROMPTS = (
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n\n"
    "def div(a, b):\n    return a / b\n\ndef add(a, b):\n",
    "Monday: wake up, run, work, read, sleep. Tuesday: wake up, run, work, read, sleep. Wednesday: wake up, "
    "run, work, read, sleep. Thursday:",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3,",
    "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the",
)
SPEC_NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


@dataclass(frozen=True)
class Preset:
    name: str
    question: str
    reference_args: dict[str, Any] = field(default_factory=dict, hash=False)
    target_args: dict[str, Any] = field(default_factory=dict, hash=False)
    options: dict[str, Any] = field(default_factory=dict, hash=False)  # flat options (names of FLAT_DEFAULTS)
    refuse: dict[str, str] = field(default_factory=dict, hash=False)  # device profile -> why it cannot run there


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # batch 1: a request finds the blocks of the earlier ones cached (a batch prefilled together hits nothing)
    Preset("prefix-caching", "does a prefix-cache hit change the logprobs?",
           {"enable_prefix_caching": False}, {"enable_prefix_caching": True},
           {"prompts": PREFIX_PROMPTS, "batch": 1}),
    Preset("chunked-prefill", "does splitting a long prompt into chunks change the logprobs?",
           {"enable_chunked_prefill": False}, {"enable_chunked_prefill": True, "max_num_batched_tokens": 64},
           {"prompts": LONG_PROMPTS, "batch": 1}),
    Preset("batch-invariance", "does a prompt's result depend on its batch and its slot in it?",
           {"max_num_seqs": 1}, {},
           {"prompts": BATCH_SLOT_PROMPTS, "batch": 4}),
    Preset("eager", "do compilation and graphs (torch.compile, CUDA graphs) change the logprobs?",
           {"enforce_eager": True}, {"enforce_eager": False}, {}),
    # vLLM refuses custom logits processors with speculative decoding: no teacher forcing on that side
    Preset("spec-decode", "does speculative decoding (n-gram; a draft model by --target-args) keep greedy tokens?",
           {}, {"speculative_config": SPEC_NGRAM},
           {"prompts": REPEATING_PROMPTS, "batch": 1, "align": "free"}),
    Preset("kv-cache-dtype", "how far does an 8-bit KV cache move the logprobs?",
           {"kv_cache_dtype": "auto"}, {"kv_cache_dtype": "fp8"}, {}),
    Preset("tp", "does tensor parallelism (tp 1 against tp 2, --tp N for another N) change the logprobs?",
           {}, {}, {"tp": 2},
           refuse={"cpu": "tensor parallelism on the CPU profile would split the same cores between ranks "
                          "(and the harness runs vLLM's CPU engine core in-process); it measures nothing a "
                          "multi-device target would. Run --ab tp on a device profile with several devices"}),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(suggest("--ab preset", name, PRESETS), option="--ab")
    return PRESETS[name]


def apply_preset(flat: dict[str, Any], explicit: frozenset[str], given_args: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The flat options with ``flat["ab"]``'s preset folded in under what the user gave (``given_args``: each
    role's ``--{role}-args``, parsed)."""
    preset = get_preset(flat["ab"])
    out = dict(flat)
    for name, value in preset.options.items():
        if name == "prompts" and {"prompts", "num_prompts"} & explicit:
            if "prompts" not in explicit:  # --num-prompts N: the preset's first N
                out["prompts"] = tuple(value[: max(1, int(flat["num_prompts"]))])
            continue
        if name not in explicit:
            out[name] = value
    for role in ("reference", "target"):
        out[f"{role}_args"] = {**getattr(preset, f"{role}_args"), **given_args[role]}
    return out


def check_preset_device(name: str | None, device: str) -> None:
    """UsageError (before any engine starts) where the preset cannot run on the target's device profile."""
    if name is None:
        return
    why = get_preset(name).refuse.get(device)
    if why:
        raise UsageError(f"--ab {name} cannot run on {device!r}: {why}", option="--ab")


def check_speculative(engine_args: dict[str, Any], role: str, align: str) -> None:
    """Speculative decoding cannot be teacher-forced: vLLM refuses custom logits processors with it
    (``STR_SPEC_DEC_REJECTS_LOGITSPROCS`` in ``vllm/v1/sample/logits_processor``), and the capture forces
    tokens through one. Such a side captures through vLLM's own logprobs, each side on its own greedy path."""
    if engine_args.get("speculative_config") and align == "forced":
        raise UsageError(f"--{role}-args sets speculative_config, which cannot be teacher-forced: vLLM refuses "
                         "custom logits processors with speculative decoding (\"Custom logits processors are not "
                         "supported when speculative decoding is enabled\"), and forcing goes through one. "
                         "Use --align free (--ab spec-decode does)", option="--align")
