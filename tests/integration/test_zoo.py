"""The model zoo on every family: built, loaded by transformers, peaked, mapped and localised; one family on vLLM.

Cost, measured through /work/team/heavy on this machine's 2 shared cores: 126 s with the eleven zoo folders
made from scratch (the default model already converted), 71 s once they exist; the vLLM case is 42-57 s of it.

Integration tier (torch and transformers in the test process). Per family, cheaply (2 layers, one prompt's
prefill, in-process: ~2 s a family once the folders exist): the zoo folder loads with no missing or unexpected
tensor, its next-token distributions are peaked (entropy far below uniform), the real module tree maps onto
the family's sub-modules (router and experts, QK-norms, sandwich norms), and a planted head permutation is
localised to its layer by the harness's own rule. vLLM's side of every family (fp32 parity with transformers,
faults flagged at fp32 and bf16, --localize) is in scripts/zoo_table.py and docs/zoo.md: one vLLM engine start
per family would cost the suite minutes; one CLI run here checks it on the MoE family.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from tests.helpers import REPO, SHARED_MODELS, make_cache_dir, run_cli

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vllm_rbln_exec.compare.layers import FLOOR, localize_prompt  # noqa: E402
from vllm_rbln_exec.engines.hidden_hooks import Recorder  # noqa: E402
from vllm_rbln_exec.setup.faults import parse_fault, plant  # noqa: E402
from vllm_rbln_exec.setup.models import truncate_model  # noqa: E402
from vllm_rbln_exec.setup.zoo import make_zoo_model  # noqa: E402
from vllm_rbln_exec.setup.zoo_families import FAMILIES  # noqa: E402

PROMPT = "The capital of France is Paris, and the capital of Germany is"
SUBS = {  # what --localize --localize-modules sees inside a layer, per family (forward order)
    "zoo-qwen3": ["q_norm", "k_norm"], "zoo-qwen3-moe": ["q_norm", "k_norm", "router", "experts"],
    "zoo-mixtral": ["router", "experts"], "zoo-olmoe": ["q_norm", "k_norm", "router", "experts"],
    "zoo-gemma3": ["q_norm", "k_norm", "pre_feedforward_layernorm", "post_feedforward_layernorm"],
    "zoo-gemma2": ["pre_feedforward_layernorm", "post_feedforward_layernorm"],
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The converted default model, the zoo's source (converted once for the whole suite, in a worker)."""
    from vllm_rbln_exec.pipeline.context import RunContext
    from vllm_rbln_exec.pipeline.models import prepare_model

    ctx = RunContext.create(str(make_cache_dir(tmp_path_factory.mktemp("zoo"))), None, 900)
    return prepare_model(ctx, "smollm2-135m", None)[1]


def _load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _capture(model, ids):
    recorder = Recorder(model, "transformers", modules=True)
    recorder.arm([0], [])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1]
    rows = recorder.arrays()
    recorder.remove()
    return recorder.names, rows, torch.log_softmax(logits.double(), -1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_is_peaked_maps_and_localises(family, source, tmp_path):
    folder = make_zoo_model(SHARED_MODELS / family, family, source)
    cut = truncate_model(folder, 2, SHARED_MODELS)
    tok = transformers.AutoTokenizer.from_pretrained(str(cut))
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    names, honest, lp = _capture(_load(cut), ids)
    entropy = float(-(lp.exp() * lp).sum())
    assert entropy < 0.5 * math.log(lp.numel()), entropy  # peaked: uniform over 49152 tokens is 10.8 nats
    subs = [n.split(".", 2)[2] for n in names if n.startswith("layers.1.")]
    assert {"attn", "mlp", *SUBS.get(family, [])} <= set(subs), subs
    faulty = plant(cut, tmp_path / "swap", parse_fault("swap-heads:1:0:1"))
    names_f, rows_f, lp_f = _capture(_load(faulty), ids)
    assert names_f == names
    judged = localize_prompt(names, [0], honest, rows_f, None, FLOOR["float32"])["positions"][0]
    assert judged["first"] == "layers.1" and judged["module"] == "attn", judged
    assert float(np.abs((lp_f - lp).numpy()).max()) > 1e-3  # the fault moves the distribution


def test_moe_family_on_vllm_holds_parity_and_flags_a_wrong_expert(source, tmp_path):
    """vLLM CPU float32 reference against transformers float32 (exit 0), then a router with two experts'
    rows swapped as the target model (exit 1): one CLI run each, 2 layers, 4 tokens."""
    cache = make_cache_dir(tmp_path)
    folder = make_zoo_model(SHARED_MODELS / "zoo-qwen3-moe", "zoo-qwen3-moe", source)
    common = ["--model", "zoo-qwen3-moe", "--num-hidden-layers", "2", "--target", "cpu", "--max-tokens", "4",
              "--num-prompts", "2", "--cache-dir", str(cache), "--use-cache", "--target-engine", "transformers"]
    honest = run_cli([*common, "--run-dir", str(tmp_path / "honest")], cwd=REPO)
    assert honest.returncode == 0, honest.stdout[-3000:] + honest.stderr[-3000:]
    faulty = plant(truncate_model(folder, 2, SHARED_MODELS), tmp_path / "swap", parse_fault("swap-experts:1:0:1"))
    bad = run_cli([*common, "--target-model", str(faulty), "--run-dir", str(tmp_path / "bad")], cwd=REPO)
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
