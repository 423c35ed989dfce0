#!/usr/bin/env python
"""Mean entropy (nats) and top-1 probability of next-token distributions of model folders, on transformers CPU fp32.

Four built-in prompts x 16 greedy tokens per folder; also says whether every checkpoint tensor was loaded (no
missing or unexpected keys). The zoo's peakedness against SmolLM2's real one (docs/zoo.md):

    python scripts/zoo_entropy.py cache/models/smollm2-135m cache/models/zoo-*

It loads models in this process (torch, transformers): run it through the machine's heavy-work lock.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from vllm_rbln_exec.setup.prompts import BUILTIN_PROMPTS  # noqa: E402


def main(paths: list[str]) -> None:
    for path in paths:
        tok = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
        ents, top1 = [], []
        for prompt in BUILTIN_PROMPTS[:4]:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
            for logits in out.logits:
                lp = torch.log_softmax(logits[0].double(), -1)
                ents.append(float(-(lp.exp() * lp).sum()))
                top1.append(float(lp.max().exp()))
        print(f"{Path(path).name:16s} H={sum(ents) / len(ents):.3f} nats  top1={sum(top1) / len(top1):.3f}  "
              f"load problems: {bad or 'none'}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
