"""Engines: the same method names over vLLM and Hugging Face transformers.

Looked up by name from lazy ``"module:Class"`` entries, so nothing heavy is
imported until a worker builds one. Every engine implements ``base.Engine``.

Out-of-tree engines: ``VLLM_RBLN_EXEC_ENGINES="NAME=module:Class[,NAME2=...]"``
adds names to this registry without shipping them in the package. It is read at
every lookup, by the main process (option checks) and by each worker (which
imports the class), so the module must be importable in the worker too
(``PYTHONPATH``). Built-in names cannot be replaced. The test suite registers
its numpy-only fake engine this way (``fake=tests.fakes.engine:FakeEngine``).
"""

from ..core.registry import LazyRegistry

ENGINES_ENV = "VLLM_RBLN_EXEC_ENGINES"

ENGINES = LazyRegistry(
    "engine",
    {
        "vllm": "vllm_rbln_exec.engines.vllm_engine:VllmEngine",
        "transformers": "vllm_rbln_exec.engines.transformers_engine:TransformersEngine",
    },
    env_var=ENGINES_ENV,
)
