"""--html, --plots and the trend through the real command line, on the fake engine; the page in a real browser.

The runs are made once per module (three fake-engine runs, seconds each). The
browser test opens the HTML of a fake-engine run and of a saved GPU run from
the docs in headless Chromium (``tests/browser.py``), at 1280 px, in the light
and in the dark colour scheme. Without Chromium it skips and says how to get it
(``make test`` installs it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.browser import PAGE_FACTS, Browser, chromium_path, contrast
from tests.fakes.model import make_fake_model
from tests.helpers import FAKE_CLI, REPO, fake_args, fake_env, run_cli

pytestmark = pytest.mark.plumbing

DRAWN = {"kl-positions", "kl-distribution", "kl-confidence", "delta-p", "flips"}  # a fake run: not localised or profiled
GPU_RUN = REPO / "docs" / "gpu-vllm-h200" / "e-vllm-bf16-profiled.json"  # saved before per-position values were kept
# SmolLM2 on an H200 (vLLM CUDA bf16, profiled, docs/gpu-smollm2.md): per-position series kept
SMOL_GPU_RUN = REPO / "docs" / "gpu-smollm2" / "vllm-bf16-profiled.json"


def cli(cwd: Path, *args: str, **switches: str):
    return run_cli(list(args), cwd=cwd, env=fake_env(**switches), module=FAKE_CLI, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three runs of one model and prompts (the target moved a little more each time), and one of other prompts."""
    root = tmp_path_factory.mktemp("pictures")
    model = make_fake_model(root / "fake-4l", num_hidden_layers=4)
    out = {}
    for name, shift, extra in (("build-1", "0.1", ["--html", str(root / "build-1.html"), "--plots",
                                                   str(root / "plots")]),
                               ("build-2", "0.3", []), ("build-3", "0.6", []), ("other", "0.1", ["--num-prompts", "1"])):
        res = cli(root, "--cache-dir", str(root / "cache"), "--run-dir", str(root / name), *fake_args(model),
                  "--use-cache", "--no-inspect-logits", "--no-default-gates", *extra, sides="target", shift=shift)
        assert res.returncode == 0, res.stdout + res.stderr
        out[name] = root / name
    return out


def figures(page: str) -> tuple[set[str], set[str]]:
    drawn = set(re.findall(r'<figure id="([^"]+)" class="plot">', page))
    return drawn, set(re.findall(r'<figure id="([^"]+)" class="no-plot">', page))


def test_a_run_writes_a_self_contained_page_and_plot_files(runs):
    root = runs["build-1"].parent
    page = (root / "build-1.html").read_text()
    drawn, not_drawn = figures(page)
    assert drawn == DRAWN and not_drawn == {"layers", "speed"}
    assert "Not drawn: the run was not localised" in page
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch
    assert page.count("<svg") == len(DRAWN)
    files = {p.name for p in (root / "plots").iterdir()}
    assert {f"{n}.{ext}" for n in DRAWN for ext in ("png", "svg")} <= files and "README.txt" in files
    assert (root / "plots" / "kl-positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_of_the_saved_run_writes_the_same_page(runs, tmp_path):
    res = cli(tmp_path, "compare", str(runs["build-1"]), "--no-default-gates", "--html", "again.html",
              "--no-inspect-logits")
    assert res.returncode == 0, res.stderr
    live = (runs["build-1"].parent / "build-1.html").read_text()
    saved = (tmp_path / "again.html").read_text()
    stamp = re.compile(r"written \d{4}-\d\d-\d\d \d\d:\d\d UTC")
    assert stamp.sub("", saved) == stamp.sub("", live)


def test_compare_of_three_runs_prints_them_side_by_side_and_draws_the_trend(runs, tmp_path):
    res = cli(tmp_path, "compare", *(str(runs[n]) for n in ("build-1", "build-2", "build-3")), "--no-default-gates",
              "--html", "trend.html", "--plots", "trend", "--no-color")
    assert res.returncode == 0, res.stdout + res.stderr
    header = next(line for line in res.stdout.splitlines() if "build-1" in line)
    assert header.index("build-1") < header.index("build-2") < header.index("build-3")
    kl = [float(x) for x in next(line for line in res.stdout.splitlines() if "KL mean" in line).split("│")[2:5]]
    assert kl[0] < kl[1] < kl[2]  # the larger shift of each later build
    page = (tmp_path / "trend.html").read_text()
    assert '<figure id="trend" class="plot"><svg' in page and "build-3" in page
    assert sorted(p.name for p in (tmp_path / "trend").iterdir()) == ["trend.png", "trend.svg"]


def test_runs_of_other_prompts_are_refused_unless_allowed(runs, tmp_path):
    args = ["compare", str(runs["build-1"]), str(runs["other"]), "--no-default-gates"]
    res = cli(tmp_path, *args)
    assert res.returncode == 2 and "prompts: build-1 has 2, other has 1" in res.stderr, res.stderr
    assert "--allow-mismatch" in res.stderr and "Traceback" not in res.stderr
    res = cli(tmp_path, *args, "--allow-mismatch", "--no-color")
    assert res.returncode == 0 and "not comparable as they stand: prompts" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("damage", ["missing", "not-json", "json-only-for-one"])
def test_a_bad_run_among_several_is_a_usage_error_without_a_traceback(runs, tmp_path, damage):
    bad = tmp_path / "bad.json"
    if damage == "not-json":
        bad.write_text("{ this is not json")
    extra = ["--json", "x.json"] if damage == "json-only-for-one" else []
    res = cli(tmp_path, "compare", str(runs["build-1"]), str(runs["build-2"] if extra else bad), *extra)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert {"missing": "does not exist", "not-json": "is not a vllm-rbln-exec report",
            "json-only-for-one": "describe one run"}[damage] in res.stderr


def test_a_run_without_pictures_never_imports_matplotlib():
    code = ("import sys; from vllm_rbln_exec import cli; from vllm_rbln_exec.pipeline import check, run, trend; "
            "from vllm_rbln_exec.outputs import terminal, files, plotdata, html; "
            "sys.exit(3 if 'matplotlib' in sys.modules else 0)")
    res = subprocess.run([sys.executable, "-c", code], env=fake_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# -- in a browser --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("Chromium is not installed (/usr/bin/chromium): `make test` installs it, "
                    "or `apt-get install -y chromium`")
    with Browser(exe) as b:
        yield b


def _saved_page(tmp_path_factory, report: Path) -> Path:
    folder = tmp_path_factory.mktemp("gpu-page")
    res = cli(folder, "compare", str(report), "--html", "gpu.html", "--no-inspect-logits")
    assert res.returncode == 0, res.stderr
    return folder / "gpu.html"


@pytest.fixture(scope="module")
def gpu_page(tmp_path_factory) -> Path:
    return _saved_page(tmp_path_factory, GPU_RUN)


@pytest.fixture(scope="module")
def smol_gpu_page(tmp_path_factory) -> Path:
    return _saved_page(tmp_path_factory, SMOL_GPU_RUN)


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("which", ["fake-run", "saved-gpu-run", "smollm2-gpu-run"])
def test_every_plot_is_drawn_visible_and_inside_a_laptop_width_page(browser, runs, gpu_page, smol_gpu_page, which,
                                                                    scheme, tmp_path):
    page, drawn = {
        "fake-run": (runs["build-1"].parent / "build-1.html", DRAWN),
        "saved-gpu-run": (gpu_page, {"kl-distribution", "kl-confidence", "speed"}),
        "smollm2-gpu-run": (smol_gpu_page, DRAWN | {"speed"}),  # everything but the per-layer chart
    }[which]
    browser.open(page, width=1280, scheme=scheme)
    facts = browser.evaluate(PAGE_FACTS)
    assert facts["fetched"] == []  # nothing loaded beyond the file itself
    assert {p["id"] for p in facts["plots"]} == drawn
    assert facts["scroll_width"] <= facts["client_width"] == 1280  # no sideways scrolling
    dark = contrast(facts["background"], "rgb(0, 0, 0)") < contrast(facts["background"], "rgb(255, 255, 255)")
    assert dark == (scheme == "dark"), facts["background"]
    for plot in facts["plots"]:
        assert plot["kind"] == "svg" and plot["shown"] and plot["marks"] > 5, plot
        assert plot["width"] > 600 and plot["height"] > 150 and min(plot["bbox"]) > 50, plot
        assert 0 <= plot["left"] and plot["right"] <= facts["client_width"], plot
        assert contrast(plot["text_fill"], facts["background"]) >= 4.5, plot  # axis labels readable
    shot = browser.screenshot(tmp_path / f"{which}-{scheme}.png")
    assert shot.stat().st_size > 20_000


def test_the_saved_gpu_run_says_which_plots_it_cannot_draw(gpu_page):
    page = gpu_page.read_text()
    assert figures(page)[1] == {"kl-positions", "delta-p", "flips", "layers"}
    assert page.count("saved without per-position values") == 3
    assert json.loads(GPU_RUN.read_text())["run"]["comparisons"][0].get("series") is None
