#!/usr/bin/env python
"""Rebuild a converted model folder on another machine, byte for byte, and prove it with its manifest.

    python scripts/rebuild_model_folder.py GGUF FOLDER

FOLDER holds what the harness wrote on the machine that made a reference file, less the weights:
``config.json``, the tokenizer files and ``.vre-manifest.json`` (the size and SHA-256 of every file,
``model.safetensors`` included). This script dequantises GGUF to float32 the way the harness's converter
does (``worker.main.task_convert_gguf``), writes ``model.safetensors`` into FOLDER, and checks the whole
folder against the manifest. Exit 0 only when every file matches, so a reference file made there is
accepted here because the model *is* the same, not because a check was skipped.

Why not convert everything again: the GGUF tokenizer conversion differs between transformers releases.
5.17's gave SmolLM2 ``eos_token`` ``<|im_start|>`` and a byte-fallback decoder where 5.19's gives
``<|im_end|>`` and a byte-level one, and the harness rightly refused a 5.19 reference file there
(tokenizer fingerprint). The dequantised weights came out identical (same SHA-256) under both.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


def main(gguf: Path, folder: Path) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import transformers
    from transformers import AutoModelForCausalLM

    from vllm_rbln_exec.setup.manifest import verify_folder

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    model.hf_quantizer = None  # as the harness's converter: save a plain float32 checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        model.save_pretrained(tmp)
        shutil.move(os.path.join(tmp, "model.safetensors"), folder / "model.safetensors")
    problem = verify_folder(folder)
    print(f"{folder}: " + ("every file matches its manifest" if problem is None else f"MISMATCH: {problem}"))
    return 0 if problem is None else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()))
