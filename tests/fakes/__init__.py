"""Test doubles that stand in for real engines: numpy only, no torch, no vLLM.

``engine.FakeEngine`` implements the engine contract (``engines/base.py``) and is
registered in tests only, through ``VLLM_RBLN_EXEC_ENGINES``; ``model`` builds
the small model folder it loads; ``cli`` runs the real command line with the
fake engine accepted (see its docstring for the two workarounds it carries).
"""
