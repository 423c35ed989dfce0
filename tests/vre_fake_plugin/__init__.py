"""A vLLM platform plugin for the harness's own tests: vLLM's CPU platform under a name of its own.

Not shipped and never installed into an environment: the plugin tests
(tests/integration/test_platform_plugin.py) lay this package out beside a
``*.dist-info`` folder whose ``entry_points.txt`` declares it in the
``vllm.platform_plugins`` group, and put that folder on ``PYTHONPATH`` of the CLI
runs that need it, so vLLM discovers it the way it discovers an installed
plugin, and no other test sees it.

``register`` is the entry point's activation function: vLLM calls it (in every
process that resolves ``current_platform`` with the plugin allowed) and uses the
class it names. Each call appends one JSON line to ``$VRE_FAKE_PLUGIN_LOG`` (when
set) with the process id and the environment variables a device profile may
set, so a test can tell which worker loaded the plugin and what reached it.

Switches, read in the worker process:
  VRE_FAKE_PLUGIN_BROKEN=N   from generated position N on, the runner-up token of every
                             next-token row is raised above the top one (worker.py):
                             a controlled fault of the plugin, not of the harness.
  VRE_FAKE_PLUGIN_LOG=FILE   where ``register`` records its calls.

This module imports nothing from vLLM: vLLM imports it while it is still
choosing its platform.
"""

from __future__ import annotations

import json
import os

PLATFORM = "vre_fake_plugin.platform.VreFakePlatform"
LOG_ENV = "VRE_FAKE_PLUGIN_LOG"
BROKEN_ENV = "VRE_FAKE_PLUGIN_BROKEN"
# the variables a device profile sets, scrubs or points at a compile cache, recorded by register()
WATCHED_PREFIXES = ("VLLM_", "RBLN_", "VRE_", "TORCHINDUCTOR_", "TRITON_", "USE_VLLM_MODEL")


def register() -> str:
    log = os.environ.get(LOG_ENV)
    if log:
        env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(WATCHED_PREFIXES)}
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "event": "register", "env": env}) + "\n")
    return PLATFORM
