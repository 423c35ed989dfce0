"""``python -m vllm_rbln_exec``: the command line, as the installed ``vllm-rbln-exec`` script."""

from .cli import main

if __name__ == "__main__":
    main()
