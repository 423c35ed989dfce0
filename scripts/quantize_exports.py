"""Quantized and converted exports of a model, for ``vllm-rbln-exec corpus`` to measure (docs/corpus.md).

Round-to-nearest (RTN) quantization with compressed-tensors, the format and library vLLM loads
quantized checkpoints from (``quant_method: compressed-tensors``): the model is loaded in transformers, each
decoder linear layer gets a quantization scheme (``apply_quantization_config``), its weight scales come from
the min and max of each channel or group (``calculate_qparams``, what compressed-tensors' default
``memoryless_minmax`` observer and llm-compressor's data-free RTN do), and ``ModelCompressor`` packs the
weights and writes ``quantization_config`` into ``config.json``. The embedding (tied to the output head) and
the norms stay at 16 bits, as llm-compressor's recipes leave ``lm_head`` alone.

Why compressed-tensors and not llm-compressor: compressed-tensors 0.17 is already installed as a dependency
of vLLM 0.32; llm-compressor 0.14 would pull transformers back to 5.17 (and datasets, pandas, pyarrow,
auto-round), which the harness's pinned stack must not take, and it adds nothing to data-free RTN.

Formats (``--formats``, comma-separated):
  bf16   the model in bfloat16 (a converted checkpoint, no quantization)
  w8a16  int8 weights, symmetric, per group; 16-bit activations
  w4a16  int4 weights, symmetric, per group, packed into int32; 16-bit activations
  w8a8   int8 weights per channel; int8 activations per token, dynamic (vLLM's CPU int8 kernels)
  fp8    fp8 (e4m3) weights per channel; fp8 activations per token, dynamic
  w4a8   int4 weights per group; int8 activations per token, dynamic. Packed (pack-quantized): the format
         vLLM 0.32 maps to its int4 x int8 kernel; compressed-tensors alone would infer int-quantized here,
         and says so in a warning

Group size: 128 (the presets') where it divides every quantized layer's input, else 64, else 32 (SmolLM2's
hidden size 576 = 4.5 x 128, so its groups are 64). Each export is written to a temporary folder and renamed
into place, so a folder that exists is complete; an existing one is kept (``--force`` makes it again).

Run with the environment that has torch, transformers and compressed-tensors (the project's .venv):
    .venv/bin/python scripts/quantize_exports.py --model smollm2-135m --out exports
    .venv/bin/python scripts/quantize_exports.py --model cache/models/smollm2-135m --formats w8a8,w4a16
    .venv/bin/python scripts/quantize_exports.py --num-hidden-layers 2 --out cache/models/exports  # the tests'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

FORMATS = {
    # name: (compressed-tensors preset, compression format, grouped, what it is)
    "bf16": (None, None, False, "bfloat16 copy, not quantized"),
    "w8a16": ("W8A16", "pack-quantized", True, "int8 weights per group, 16-bit activations"),
    "w4a16": ("W4A16", "pack-quantized", True, "int4 weights per group, 16-bit activations"),
    "w8a8": ("W8A8", "int-quantized", False, "int8 weights per channel, int8 activations per token (dynamic)"),
    "fp8": ("FP8_DYNAMIC", "float-quantized", False, "fp8 weights per channel, fp8 activations per token (dynamic)"),
    "w4a8": ("W4A8", "pack-quantized", True, "int4 weights per group, int8 activations per token (dynamic)"),
}
DEFAULT_FORMATS = "bf16,w8a16,w8a8,fp8,w4a16,w4a8"
MANIFEST = "vre-export.json"


def group_size(model, preferred: int = 128) -> int:
    """The largest of 128, 64, 32 that divides the input size of every decoder linear layer."""
    import torch

    sizes = {m.in_features for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in name}
    for size in (preferred, 64, 32):
        if all(s % size == 0 for s in sizes):
            return size
    raise SystemExit(f"no group size of 128, 64 or 32 divides the layers' input sizes {sorted(sizes)}")


def _observe(module) -> None:
    """Round-to-nearest scales (and zero points) of one module's weight from its min and max per channel/group."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = module.quantization_scheme.weights
    weight = module.weight.detach().float()
    if args.strategy == "channel":
        lo, hi = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    elif args.strategy == "group":
        grouped = weight.reshape(weight.shape[0], -1, args.group_size)
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    elif args.strategy == "tensor":
        lo, hi = weight.amin().reshape(1), weight.amax().reshape(1)
    else:
        raise SystemExit(f"strategy {args.strategy!r} is not handled by this script")
    scale, zero = calculate_qparams(lo, hi, args)
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape)
                                            .to(module.weight_zero_point.dtype))


def quantize(model, fmt: str) -> dict:
    """Quantize ``model`` in place as ``fmt`` and compress it; returns what was done (for the manifest)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    preset, compression, grouped, _ = FORMATS[fmt]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if grouped:
        scheme.weights.group_size = group_size(model, scheme.weights.group_size or 128)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=compression)
    apply_quantization_config(model, config)
    layers = 0
    for _, module in model.named_modules():
        scheme_of = getattr(module, "quantization_scheme", None)
        if scheme_of is not None and scheme_of.weights is not None:
            _observe(module)
            layers += 1
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=compression)
    compressor.compress_model(model)
    return {"compressor": compressor, "preset": preset, "format": compression, "layers": layers,
            "group_size": scheme.weights.group_size if grouped else None}


def export(src: Path, dest: Path, fmt: str) -> dict:
    """Write ``src`` as ``fmt`` into ``dest`` (through a temporary folder); returns the manifest."""
    import compressed_tensors
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16, local_files_only=True)
    done = {"preset": None, "format": None, "layers": 0, "group_size": None}
    if FORMATS[fmt][0] is not None:
        done = quantize(model, fmt)
    compressor = done.pop("compressor", None)
    model.save_pretrained(str(tmp))
    if compressor is not None:
        compressor.update_config(str(tmp))
    for item in src.iterdir():  # the tokenizer byte for byte: re-saving it would change its fingerprint
        if item.is_file() and not item.name.startswith(".") and not (tmp / item.name).exists() \
                and not item.name.endswith((".safetensors", ".bin", ".pt", ".gguf")):
            shutil.copy2(item, tmp / item.name)
    manifest = {"export": fmt, "what": FORMATS[fmt][3], "from": str(src), "method": "round-to-nearest (min-max)",
                "compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1), **done}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return manifest


def model_folder(name: str, cache_dir: str, layers: int | None) -> Path:
    """The model folder the harness itself would load: an alias converted once into its cache, and cut to its
    first ``layers`` decoder layers when asked (the same cut as ``--num-hidden-layers``)."""
    if Path(name).is_dir() and not layers:
        return Path(name)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from vllm_rbln_exec.pipeline.context import RunContext
    from vllm_rbln_exec.pipeline.models import prepare_model

    _, path = prepare_model(RunContext.create(cache_dir, None, 1800.0), name, layers)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model folder, or an alias of the harness")
    parser.add_argument("--out", default="exports", help="exports go to OUT/<model folder name>-<format>")
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--cache-dir", default="cache", help="the harness's cache (for an alias)")
    parser.add_argument("--num-hidden-layers", type=int, default=None,
                        help="export the first N decoder layers only (for tests; as the harness cuts them)")
    parser.add_argument("--force", action="store_true", help="make exports that exist again")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; known: {', '.join(FORMATS)}")
    src = model_folder(args.model, args.cache_dir, args.num_hidden_layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from vllm_rbln_exec.setup.models import folder_lock

    for fmt in formats:
        dest = out / f"{src.name}-{fmt}"
        with folder_lock(dest):  # two test runs making the same export: the second waits, then keeps it
            if dest.is_dir() and (dest / MANIFEST).is_file() and not args.force:
                print(f"{dest}: exists, kept")
                continue
            manifest = export(src, dest, fmt)
        print(f"{dest}: {manifest['what']} ({manifest['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
