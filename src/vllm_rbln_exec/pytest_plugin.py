"""The pytest plugin: parity checks inside a plugin team's own test suite.

Registered through the ``pytest11`` entry point, so installing vllm-rbln-exec
is enough. It gives:

* the ``parity`` fixture: ``parity.check(model=..., target=..., **options)``
  runs one judged parity check (``check.check_parity``) with any option of a
  run (the flat option names of ``setup.options.FLAT_DEFAULTS``) and returns a ``ParityOutcome``;
  ``.assert_ok()`` fails the test with every violation, each naming the prompt,
  position, metric, value and tolerance;
* the ``parity`` marker, default options for the checks of one test
  (``@pytest.mark.parity(target="rbln", max_tokens=32)``);
* the ``parity_device(NAME)`` marker with ``--parity-device NAME`` to select
  which device's tests run: without the option a marked test runs where its
  device is present (cpu always, cuda with a visible GPU, rbln with its plugin);
* session options ``--parity-target``, ``--parity-cache-dir``,
  ``--parity-require-cache``, ``--parity-fail-on``, ``--parity-spec`` and
  ``--parity-runs-dir`` that CI sets once for every check.

Importing this module must stay cheap (pytest loads it in every session of
every project that has the package installed): no torch, no vLLM, and the
harness itself is imported only when a check runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

GROUP = "vllm-rbln-exec parity"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vllm-rbln-exec", GROUP)
    group.addoption("--parity-target", default=None, metavar="NAME",
                    help="device every parity.check runs its target on, unless the test names one")
    group.addoption("--parity-device", action="append", default=[], metavar="NAME",
                    help="run only tests marked parity_device(NAME) (repeatable; 'all' runs every one)")
    group.addoption("--parity-cache-dir", default=None, metavar="DIR",
                    help="the harness's cache folder (converted models, cached references)")
    group.addoption("--parity-require-cache", action="store_true", default=False,
                    help="a reference that is not cached fails the check instead of being computed")
    group.addoption("--parity-fail-on", action="append", default=[], metavar="EXPR",
                    help="extra tolerance for every check, as --fail-on (repeatable)")
    group.addoption("--parity-spec", default=None, metavar="FILE", help="TOML parity spec for every check")
    group.addoption("--parity-runs-dir", default=None, metavar="DIR",
                    help="keep run folders here (default: the test's tmp_path)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "parity(**options): default options of parity.check in this test")
    config.addinivalue_line("markers", "parity_device(name): a parity test for that device; selected with "
                                       "--parity-device, else run where the device is present")


def _device_present(name: str) -> bool:
    from .setup.devices import gpu_visible, rbln_plugin_installed

    if name == "cpu":
        return True
    if name == "cuda":
        return gpu_visible()
    if name == "rbln":
        return rbln_plugin_installed()
    return False  # a user-defined device: only when asked for with --parity-device


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = set(config.getoption("--parity-device") or [])
    for item in items:
        marker = item.get_closest_marker("parity_device")
        if marker is None or not marker.args:
            continue
        device = str(marker.args[0])
        if wanted:
            if "all" not in wanted and device not in wanted:
                item.add_marker(pytest.mark.skip(reason=f"parity device {device} not selected by --parity-device"))
        elif not _device_present(device):
            item.add_marker(pytest.mark.skip(reason=f"parity device {device} is not present here "
                                                    f"(select it with --parity-device {device})"))


class ParityHarness:
    """What the ``parity`` fixture hands a test."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path):
        self.request = request
        self.tmp_path = tmp_path
        self.outcomes: list[Any] = []

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The options one check runs with: session options < parity marker < the call's."""
        config = self.request.config
        opts: dict[str, Any] = {}
        if config.getoption("--parity-target"):
            opts["target"] = config.getoption("--parity-target")
        if config.getoption("--parity-cache-dir"):
            opts["cache_dir"] = config.getoption("--parity-cache-dir")
        if config.getoption("--parity-require-cache"):
            opts["require_cache"] = True
        if config.getoption("--parity-spec"):
            opts["spec"] = config.getoption("--parity-spec")
        for marker in reversed(list(self.request.node.iter_markers("parity"))):
            opts.update(marker.kwargs)
        device = self.request.node.get_closest_marker("parity_device")
        if device is not None and device.args and "target" not in overrides:
            opts["target"] = str(device.args[0])
        opts.update(overrides)
        opts["fail_on"] = list(opts.get("fail_on") or []) + list(config.getoption("--parity-fail-on") or [])
        if "run_dir" not in opts:
            runs = config.getoption("--parity-runs-dir")
            base = Path(runs) if runs else self.tmp_path
            # the node name repeats across modules and sessions share --parity-runs-dir: add time and pid
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            name = f"{self.request.node.name}-{len(self.outcomes) + 1}-{stamp}".replace("/", "_")
            opts["run_dir"] = str(base / name)
        return opts

    def check(self, **options: Any):
        """Run one judged parity check; returns a ``ParityOutcome`` (call ``.assert_ok()`` on it).

        A run the harness cannot carry out (missing model, worker crash, bad
        option) fails the test with the harness's message, not a traceback.
        """
        from .core.errors import HarnessError
        from .pipeline.check import check_parity
        from .setup.options import build_options
        from .worker.spawn import workers_end_on_sigterm

        opts = self.options(**options)
        try:
            run_options = build_options(**opts)
        except HarnessError as exc:
            pytest.fail(f"parity.check: {exc.message}", pytrace=False)
        try:
            with workers_end_on_sigterm():
                outcome = check_parity(run_options)
        except HarnessError as exc:
            detail = f"\n{exc.detail}" if exc.detail else ""
            pytest.fail(f"parity.check could not run (exit {exc.exit_code}): {exc.message}{detail}", pytrace=False)
        self.outcomes.append(outcome)
        return outcome


@pytest.fixture
def parity(request: pytest.FixtureRequest, tmp_path: Path) -> ParityHarness:
    """Parity checks against the CPU reference: ``parity.check(model=..., target=...).assert_ok()``."""
    return ParityHarness(request, tmp_path)
