"""The journal of an unfinished capture: which prompts (corpus windows) are already written, so a capture
that was interrupted continues where it stopped instead of starting again.

One JSON line per finished prompt, appended after its rows were flushed to their ``.npy`` file, in
``journal.jsonl`` beside the arrays. A line names the prompt's record (``store.PromptRecord`` fields), so
restoring it is reading the line back; a line whose array is missing or of the wrong shape (the file was
damaged, or the process died between the two writes) is dropped and that prompt is made again. Only a
folder without ``capture.json`` (``store.CaptureWriter.finish`` writes it last) is ever resumed. This module
must not import torch or know about engines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .store import PromptRecord

JOURNAL = "journal.jsonl"


class Journal:
    def __init__(self, root: Path):
        self.path = Path(root) / JOURNAL

    def append(self, record: PromptRecord) -> None:
        line = json.dumps({"index": record.index, "prompt": record.prompt,
                           "prompt_token_ids": record.prompt_token_ids, "token_ids": record.token_ids,
                           "text": record.text, "logprobs_file": record.logprobs_file}, separators=(",", ":"))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def restore(self, width: int) -> dict[int, PromptRecord]:
        """The prompts already written whose rows are intact ([tokens, width] float32), by index."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return {}
        out: dict[int, PromptRecord] = {}
        for line in lines:
            try:
                data = json.loads(line)
                record = PromptRecord(index=int(data["index"]), prompt=str(data["prompt"]),
                                      prompt_token_ids=[int(t) for t in data["prompt_token_ids"]],
                                      token_ids=[int(t) for t in data["token_ids"]], text=str(data["text"]),
                                      logprobs_file=str(data["logprobs_file"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the interruption
            if _intact(self.path.parent / record.logprobs_file, (len(record.token_ids), width)):
                out[record.index] = record
        return out


def _intact(path: Path, shape: tuple[int, int]) -> bool:
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return rows.dtype == np.float32 and rows.shape == shape
