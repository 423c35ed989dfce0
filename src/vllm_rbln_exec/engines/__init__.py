"""Engines: the same method names over vLLM and Hugging Face transformers.

Looked up by name from lazy ``"module:Class"`` entries, so nothing heavy is
imported until a worker builds one. Every engine implements ``base.Engine``.
"""

from ..core.registry import LazyRegistry

ENGINES = LazyRegistry(
    "engine",
    {
        "vllm": "vllm_rbln_exec.engines.vllm_engine:VllmEngine",
        "transformers": "vllm_rbln_exec.engines.transformers_engine:TransformersEngine",
    },
)
