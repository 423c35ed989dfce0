"""A/B presets (``--ab NAME``): two sides on one device, differing in one engine feature.

One table, ``PRESETS``: each preset names the question it answers, the engine
arguments of each side, the flat options it sets (prompts that exercise the
feature, batch, alignment), the tolerances that fit it and why, and the devices
where it cannot run. ``apply_preset`` folds a preset into the flat options
before they are checked, under everything the user gave: the user's engine
arguments win key by key, the user's ``--fail-on`` replaces a preset gate on the
same metric, and any option given on the command line stays as given. The
reference runs on the target's device (``pipeline.sides``). Nothing here starts
an engine or imports torch or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.errors import UsageError
from ..core.registry import suggest
from ..verdict.gates import parse_gate

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
    fail_on: tuple[str, ...] = ()  # tolerances; the built-in defaults of the dtype pair stay on as well
    why: str = ""  # why these tolerances (numbers: docs/ab.md, with the command that measured them)
    refuse: dict[str, str] = field(default_factory=dict, hash=False)  # device profile -> why it cannot run there


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("prefix-caching", "does a prefix-cache hit change the logprobs?",
           {"enable_prefix_caching": False}, {"enable_prefix_caching": True},
           # batch 1: a request finds the blocks of the earlier ones cached (a batch prefilled together hits nothing)
           {"prompts": PREFIX_PROMPTS, "batch": 1},
           # CPU fp32, 2 layers, 3 prompts x 8 tokens (docs/ab.md): max|Δ| 0, KL 0. Not promised bit-exact by vLLM
           # (a hit prefills only the suffix, attending to cached K/V): 1e-3 is ~19x the fp32 rounding scale
           # measured by batch-invariance (5.3e-5), far under a wrong block (KL 1e-2 and more)
           ("max_abs>1e-3",),
           "a hit reuses the K/V the same kernels wrote; only the suffix's prefill is shorter. Measured "
           "bit-identical on the CPU; the limit allows fp32 rounding, not a wrong cached block"),
    Preset("chunked-prefill", "does splitting a long prompt into chunks change the logprobs?",
           {"enable_chunked_prefill": False}, {"enable_chunked_prefill": True, "max_num_batched_tokens": 64},
           {"prompts": LONG_PROMPTS, "batch": 1},
           # CPU fp32 (docs/ab.md): max|Δ| 0, KL 0 with 64-token chunks of ~280-token prompts; 1e-3 as above
           ("max_abs>1e-3",),
           "not promised bit-exact: a chunk attends to the earlier chunks' cached K/V with another kernel "
           "split, so sums may run in another order; fp32 rounding at most (bit-identical on the CPU)"),
    Preset("batch-invariance", "does a prompt's result depend on its batch and its slot in it?",
           {"max_num_seqs": 1}, {},
           {"prompts": BATCH_SLOT_PROMPTS, "batch": 4},
           # CPU fp32 (docs/ab.md): max|Δ| 5.3e-5 in every prompt, KL max 1.4e-11, top-1 1.0; 1e-3 is ~19x that
           ("max_abs>1e-3",),
           "vLLM promises batch invariance only in its batch-invariant mode (VLLM_BATCH_INVARIANT=1, CUDA); "
           "elsewhere batch 1 and batch N may differ by rounding (measured in docs/ab.md)"),
    Preset("eager", "do compilation and graphs (torch.compile, CUDA graphs) change the logprobs?",
           {"enforce_eager": True}, {"enforce_eager": False}, {},
           ("kl_mean>1e-4", "top1<0.99"),
           "compiled kernels fuse and reorder arithmetic: rounding differences, never a different model"),
    Preset("spec-decode", "does speculative decoding (n-gram; a draft model by --target-args) keep greedy tokens?",
           {}, {"speculative_config": SPEC_NGRAM},
           # vLLM refuses custom logits processors with speculative decoding: no teacher forcing on that side
           {"prompts": REPEATING_PROMPTS, "batch": 1, "align": "free"},
           ("prompt:tokens_equal<1",),
           "greedy speculative decoding must give the greedy tokens; the logprobs of the accepted tokens "
           "are judged by the default tier of the dtype pair (verification scores k+1 positions at once)"),
    Preset("kv-cache-dtype", "how far does an 8-bit KV cache move the logprobs?",
           {"kv_cache_dtype": "auto"}, {"kv_cache_dtype": "fp8"}, {},
           ("kl_mean>1e-2", "kl_p99>1e-1", "top1<0.9"),
           "fp8 (e4m3) keeps 3 mantissa bits: K/V round by up to 6%, a quantisation far coarser than bf16; "
           "the bf16 tier is the right order of magnitude, not exact equality"),
    Preset("tp", "does tensor parallelism (tp 1 against tp 2, --tp N for another N) change the logprobs?",
           {}, {}, {"tp": 2},
           ("kl_mean>1e-4", "top1<0.99"),
           "all-reduce sums the partial products in another order: rounding only",
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
    user = tuple(flat.get("fail_on") or ())
    replaced = {parse_gate(e).key for e in user}
    out["fail_on"] = tuple(e for e in preset.fail_on if parse_gate(e).key not in replaced) + user
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
