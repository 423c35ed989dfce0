"""Two captures compared prompt by prompt: the entry from captures to ``PromptComparison`` records.

Checks that the captures can be compared (same mode, or full rows against top-N ones; vocabulary; prompts;
no logprob above 0, ``sanity``) and hands each prompt's arrays to ``metrics.compare_prompt``. It reads
captures; it must not judge, render or know where the captures came from.
"""

from __future__ import annotations

from ..capture.store import FULL, TOPN, Capture
from ..core.errors import HarnessError
from .metrics import PromptComparison, compare_prompt
from .sanity import impossible_rows


def compare_captures(reference: Capture, target: Capture, *, aligned: bool, eps: float, topk: int,
                     snippet_elems: int, tie_margin: float) -> list[PromptComparison]:
    """``aligned``: the target was teacher-forced on the reference's tokens, so every position compares."""
    modes = {reference.mode, target.mode}
    if len(modes) > 1 and modes != {FULL, TOPN}:  # full against top-N: a server that gives only its top N
        raise HarnessError(f"the sides captured differently ({reference.mode} vs {target.mode})")
    full = [c for c in (reference, target) if c.mode == FULL]
    if len(full) == 2 and reference.vocab_size != target.vocab_size:
        raise HarnessError(f"vocabulary sizes differ: reference {reference.vocab_size}, target {target.vocab_size}")
    vocab = full[0].vocab_size if full else (reference.vocab_size
                                             or int(reference.settings.get("tokenizer_vocab_size", 0)))
    for capture in (reference, target):
        if capture.mode == TOPN:
            top = _max_id(capture) + 1
            if full and top > vocab:
                raise HarnessError(f"the {capture.info.side} holds token id {top - 1}, outside the other side's "
                                   f"vocabulary of {vocab}")
            vocab = max(vocab, top)
    out = []
    for i, (r, t) in enumerate(zip(reference.prompts, target.prompts)):
        if r.prompt != t.prompt:
            raise HarnessError(f"prompt {i} differs between the captures")
        ref_rows, tgt_rows = reference.logprobs(i), target.logprobs(i)
        problem = impossible_rows(ref_rows, "reference", i) or impossible_rows(tgt_rows, "target", i)
        if problem:
            raise HarnessError(problem)
        out.append(compare_prompt(
            i, r.prompt,
            {"token_ids": r.token_ids, "text": r.text, "logprobs": ref_rows, "ids": reference.top_ids(i)},
            {"token_ids": t.token_ids, "text": t.text, "logprobs": tgt_rows, "ids": target.top_ids(i)},
            vocab_size=vocab, eps=eps, topk=topk, snippet_elems=snippet_elems, aligned=aligned,
            tie_margin=tie_margin,
        ))
    return out


def _max_id(capture: Capture) -> int:
    best = 0
    for i in range(len(capture.prompts)):
        ids = capture.top_ids(i)
        if ids is not None and ids.size:
            best = max(best, int(ids.max()))
    return best
