"""vllm-rbln-exec: logprob parity between a CPU reference and a target device."""

__version__ = "0.1.0"
