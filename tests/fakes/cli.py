"""``python -m tests.fakes.cli ARGS``: the real command line (``vllm_rbln_exec.cli.main``), with the
engines of ``$VLLM_RBLN_EXEC_ENGINES`` usable. Two temporary workarounds, each for a
check outside tests/ that still refuses an out-of-tree engine:

1. ``setup/options.py`` validates ``--reference-engine`` / ``--target-engine``
   against its own tuple ``ENGINES = ("vllm", "transformers")``; here that tuple
   is replaced by the registry's names. Fix: validate with
   ``vllm_rbln_exec.engines.ENGINES.check(engine, option=...)``.
2. ``DeviceProfile.build_env`` (``setup/devices.py``) applies the profile's
   ``scrub`` patterns to every inherited variable, and the cpu profile scrubs
   ``VLLM_RBLN_*``, which matches the harness's own ``VLLM_RBLN_EXEC_ENGINES``:
   the worker would never see the fake engine. Here the harness's own
   ``VLLM_RBLN_EXEC_*`` variables are put back after scrubbing (and recorded as
   not scrubbed). Fix: never scrub ``VLLM_RBLN_EXEC_*`` in ``build_env``.

Both are pinned by strict xfail tests in tests/unit/test_engine_registry.py; when
they start passing, drop the matching part here (and, with both gone, call
``python -m vllm_rbln_exec`` directly).
"""

from __future__ import annotations

import functools

OWN_PREFIX = "VLLM_RBLN_EXEC_"


def install() -> None:
    from vllm_rbln_exec.engines import ENGINES
    from vllm_rbln_exec.setup import devices, options

    names = tuple(ENGINES.names())
    if set(names) - set(options.ENGINES):
        options.ENGINES = names  # workaround 1

    original = devices.DeviceProfile.build_env
    if getattr(original, "_keeps_own_vars", False):
        return

    @functools.wraps(original)
    def build_env(self, base, *args, **kwargs):  # workaround 2
        env, record = original(self, base, *args, **kwargs)
        for key, value in base.items():
            if key.startswith(OWN_PREFIX) and key not in env:
                env[key] = value
                record["scrubbed"] = [k for k in record["scrubbed"] if k != key]
        return env, record

    build_env._keeps_own_vars = True
    devices.DeviceProfile.build_env = build_env


def main() -> None:
    install()
    from vllm_rbln_exec.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
