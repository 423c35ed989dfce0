#!/usr/bin/env python
"""Which yardstick predicts honest bf16 error better: a real bf16 engine, or fp32 with bf16-size noise?

The issue behind the yardstick (docs/yardstick.md) names two ways to get "what
honest arithmetic at the target's precision gives": run an honest engine at
that precision (the harness's yardstick side), or run the float32 reference
with noise of the precision's unit roundoff injected after every decoder layer
(as exllamav3's qbench does). This probe measures the second against the
first, on the same forced tokens, with transformers on the CPU:

    KL(fp32 || bf16 engine)                      honest bf16, what a bf16 device computes
    KL(fp32 || fp32 + u*|h|*N(0,1) per layer)    the noise model, u = 2^-9 (bf16), several seeds

and prints their ratio. The tokens are the reference tokens of a saved run's
capture (``--capture RUN/reference/capture``), so the positions are the ones
the harness compares. This is a measurement script: it imports torch and
transformers in its own process, never the harness's main process.

    python scripts/noise_yardstick_probe.py --model cache/models/smollm2-135m \\
        --capture runs/<run>/reference/capture
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from vllm_rbln_exec.capture.store import load_capture  # noqa: E402

BF16_U = 2.0**-9


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--capture", required=True, help="a reference capture folder (its tokens are fed)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--u", type=float, default=BF16_U)
    args = p.parse_args()
    torch.set_num_threads(2)
    capture = load_capture(Path(args.capture))
    sequences = [(list(r.prompt_token_ids), list(r.token_ids)) for r in capture.prompts]

    def logprobs(dtype, noise_seed=None):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        handles = []
        if noise_seed is not None:
            gen = torch.Generator().manual_seed(noise_seed)

            def hook(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                noisy = hidden + args.u * hidden.abs() * torch.randn(hidden.shape, generator=gen, dtype=hidden.dtype)
                return (noisy, *output[1:]) if isinstance(output, tuple) else noisy

            handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
        out = []
        with torch.no_grad():
            for prompt, tokens in sequences:
                ids = torch.tensor([prompt + tokens[:-1]])
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float()
                out.append(torch.log_softmax(logits, -1))
        for h in handles:
            h.remove()
        return out

    def kl(ref, tgt):
        values = [(r.exp() * (r - t)).sum(-1) for r, t in zip(ref, tgt)]
        return float(torch.cat(values).mean())

    fp32 = logprobs(torch.float32)
    honest = kl(fp32, logprobs(torch.bfloat16))
    print(f"KL(fp32 || transformers bf16)          {honest:.3g}")
    for seed in range(args.seeds):
        noisy = kl(fp32, logprobs(torch.float32, noise_seed=seed))
        print(f"KL(fp32 || fp32 + u-noise, seed {seed})    {noisy:.3g}   ratio to honest bf16 {noisy / honest:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
