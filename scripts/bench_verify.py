#!/usr/bin/env python
"""What verifying a reference costs: SHA-256 of every array when a capture is finished and when it is read.

Writes a q16 capture the size of a real reference (default: 100 prompts x 256
tokens over a 128256-token vocabulary, 6.6 GB of levels) with the harness's own
``CaptureWriter``, then times:

    finish      quantisation to q16 and the digests (``store_s``, ``digest_s`` as the writer records them)
    verify      ``load_capture(verify_arrays=True)``: every array hashed and checked, shapes checked
    read        reading every array once more (cold from the same page cache), the floor any check pays
    metadata    ``load_capture()`` without arrays

    python scripts/bench_verify.py [--prompts 100] [--tokens 256] [--vocab 128256] [--dir /tmp/vre-verify]

Prints a markdown table and writes JSON beside the capture. Needs numpy only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vllm_rbln_exec.capture.store import FULL, CaptureWriter, SideInfo, load_capture  # noqa: E402


def write_capture(root: Path, prompts: int, tokens: int, vocab: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    info = SideInfo(side="reference", device="cpu", engine="synthetic", platform="cpu", dtype="float32")
    writer = CaptureWriter(root, info, {"max_tokens": tokens, "logprobs": -1}, FULL)
    t0 = time.perf_counter()
    for i in range(prompts):
        lp_path, _ = writer.allocate(i, tokens, vocab, with_ids=False)
        rows = np.load(lp_path, mmap_mode="r+")
        for start in range(0, tokens, 32):  # log-softmax rows, 32 at a time (16 MB)
            z = rng.standard_normal((min(32, tokens - start), vocab), dtype=np.float32) * 3
            z -= np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)) + z.max(
                axis=1, keepdims=True)
            rows[start:start + len(z)] = z
        rows.flush()
        del rows
        writer.add(i, f"prompt {i}", [1, 2, 3], list(range(tokens)), "")
    made = time.perf_counter() - t0
    writer.finish(vocab_size=vocab, store="q16")
    return {"write_rows_s": made, "store_s": writer.info.timings.get("store_s", 0.0),
            "digest_s": writer.info.timings.get("digest_s", 0.0)}


def read_all(root: Path) -> float:
    t0 = time.perf_counter()
    for path in sorted(root.glob("*.npy")):
        with open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dir", default="/tmp/vre-verify")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    root = Path(args.dir) / "capture"
    shutil.rmtree(root, ignore_errors=True)
    timings = write_capture(root, args.prompts, args.tokens, args.vocab)
    size = sum(p.stat().st_size for p in root.glob("*.npy"))
    timings["read_s"] = read_all(root)
    t0 = time.perf_counter()
    load_capture(root, verify_arrays=True)
    timings["verify_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_capture(root)
    timings["metadata_s"] = time.perf_counter() - t0
    result = {"prompts": args.prompts, "tokens": args.tokens, "vocab": args.vocab, "bytes": size, **timings}
    (Path(args.dir) / "bench_verify.json").write_text(json.dumps(result, indent=2))
    gb = size / 1e9
    print(f"| capture | stored | q16 + digests at finish | of which digests | verified load | plain read | "
          f"metadata only |\n|---|---|---|---|---|---|---|\n"
          f"| {args.prompts} x {args.tokens} x {args.vocab} | {gb:.2f} GB | {timings['store_s']:.1f} s + "
          f"{timings['digest_s']:.1f} s | {timings['digest_s']:.1f} s ({gb / timings['digest_s']:.2f} GB/s) | "
          f"{timings['verify_s']:.1f} s ({gb / timings['verify_s']:.2f} GB/s) | {timings['read_s']:.1f} s | "
          f"{timings['metadata_s'] * 1000:.0f} ms |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
