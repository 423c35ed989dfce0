"""``python -m vllm_rbln_exec.worker REQUEST.json``: how the parent starts a worker process."""

import sys

from .main import main

if __name__ == "__main__":  # vLLM's spawned processes re-import this module
    sys.exit(main(sys.argv[1:]))
