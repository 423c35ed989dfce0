"""Pipeline step: the model folders each side will load (made, converted or truncated once, under a lock).

Owns the order of model preparation and the check that two checkpoints can be
compared; the model knowledge itself (aliases, fingerprints, truncation) lives
in ``setup.models``. Conversion runs in a worker, since it needs transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import HarnessError, UsageError
from ..setup.devices import get_profile
from ..setup.manifest import verify_folder
from ..setup.models import (
    DEFAULT_MODEL,
    ResolvedModel,
    discard_folder,
    folder_lock,
    read_config,
    resolve_model,
    text_config,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from ..setup.request import ConvertRequest, convert_task
from ..worker.spawn import WorkerJob, run_worker
from .context import RunContext


@dataclass(frozen=True)
class PreparedModels:
    reference: ResolvedModel
    reference_path: Path
    target_path: Path
    weights: str  # the reference checkpoint's fingerprint
    target_weights: str
    tokenizer: str


def prepare_models(ctx: RunContext, model: str, target_model: str | None,
                   num_hidden_layers: int | None) -> PreparedModels:
    resolved, ref_path = prepare_model(ctx, model, num_hidden_layers)
    tgt_path = ref_path
    if target_model:
        _, tgt_path = prepare_model(ctx, target_model, num_hidden_layers)
        check_same_vocabulary(ref_path, tgt_path)
    weights = weights_fingerprint(ref_path)
    return PreparedModels(reference=resolved, reference_path=ref_path, target_path=tgt_path, weights=weights,
                          target_weights=weights if tgt_path == ref_path else weights_fingerprint(tgt_path),
                          tokenizer=tokenizer_fingerprint(ref_path))


def prepare_model(ctx: RunContext, name: str, num_hidden_layers: int | None) -> tuple[ResolvedModel, Path]:
    resolved = verified(ctx, resolve_model(name, ctx.models_dir), name)
    if resolved.tiny is not None:
        ctx.progress("model", f"making the tiny model {resolved.alias.name}", {})
        from ..setup.tiny import make_tiny_model

        make_tiny_model(resolved.path, **resolved.tiny)
    if resolved.zoo is not None:
        _, source = prepare_model(ctx, DEFAULT_MODEL, None)  # the zoo is made from the default model's tensors
        ctx.progress("model", f"making the zoo model {resolved.alias.name} from {source.name}", {})
        from ..setup.zoo import make_zoo_model

        make_zoo_model(resolved.path, resolved.zoo, source)
    if resolved.needs_conversion:
        convert_gguf(ctx, resolved)
    path = resolved.path
    if num_hidden_layers:
        from ..setup.models import truncate_model

        ctx.progress("model", f"keeping the first {num_hidden_layers} layers of {name}", {})
        path = truncate_model(path, num_hidden_layers, ctx.models_dir, on_rebuild=lambda why: _rebuilt(ctx, why))
    return resolved, path


def verified(ctx: RunContext, resolved: ResolvedModel, name: str) -> ResolvedModel:
    """A folder the harness made for an alias (tiny model, converted GGUF), checked against its manifest;
    a damaged one is removed, so the steps below make it again. Folders the user brings are theirs."""
    alias, path = resolved.alias, resolved.path
    if alias is None or not alias.made or path is None or not path.exists():
        return resolved
    if path.parent.resolve() != ctx.models_dir.resolve():
        return resolved  # found elsewhere (the Hugging Face cache): not made by the harness
    problem = verify_folder(path)
    if problem is None:
        return resolved
    with folder_lock(path):
        if path.exists() and verify_folder(path) is not None:
            discard_folder(path)
    again = resolve_model(name, ctx.models_dir)
    if not (again.tiny or again.zoo or again.needs_conversion):
        raise HarnessError(f"the model folder {path} failed verification ({problem}) and cannot be made again "
                           f"here: its source is gone. Reinstall it (`{alias.install_command}`) and run "
                           "again.")
    _rebuilt(ctx, f"{path} failed verification ({problem}); made again from its source")
    return again


def _rebuilt(ctx: RunContext, why: str) -> None:
    ctx.note(why)
    ctx.progress("model", why, {"stage": "convert"})


def convert_gguf(ctx: RunContext, resolved: ResolvedModel) -> None:
    ctx.progress("model", f"converting {resolved.gguf_file.name} (once)", {})
    cpu = get_profile("cpu", ctx.profiles, option="--devices")
    env, _ = cpu.build_env(ctx.base_env(), ctx.cache_root / "compile" / "convert")
    task = convert_task(ctx.models_dir / ".conversion", ConvertRequest(str(resolved.gguf_file), str(resolved.path),
                                                                             resolved.assembler))
    run_worker(WorkerJob(task=task, env=env, timeout=ctx.timeout), on_event=ctx.on_event("model"))


def check_same_vocabulary(ref_path: Path, tgt_path: Path) -> None:
    """Refuse, before any engine starts, two checkpoints that cannot be compared."""
    if ref_path == tgt_path:
        return
    ref_vocab = text_config(read_config(ref_path)).get("vocab_size")
    tgt_vocab = text_config(read_config(tgt_path)).get("vocab_size")
    if ref_vocab and tgt_vocab and ref_vocab != tgt_vocab:
        raise UsageError(
            f"--target-model has a vocabulary of {tgt_vocab} tokens, the reference model {ref_vocab}: "
            "logprobs over different vocabularies cannot be compared",
            option="--target-model",
        )
    if tokenizer_fingerprint(ref_path) != tokenizer_fingerprint(tgt_path):
        raise UsageError(
            "--target-model ships a different tokenizer than the reference model "
            f"({tgt_path} vs {ref_path}); token ids would not mean the same thing",
            option="--target-model",
        )
