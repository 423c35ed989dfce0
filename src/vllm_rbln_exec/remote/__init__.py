"""A side that is a running OpenAI-compatible server, captured by an HTTP client instead of a worker process.

``client`` speaks HTTP (httpx: timeouts, retries with backoff, the API key), ``probe`` asks the server what it
is and what it allows before anything starts, ``rows`` turns its logprobs into capture rows and ``capture``
writes a capture folder in the store's format (``capture.store``), so comparing, judging and reporting work
on it unchanged. Plain HTTP and numpy: the main process runs all of it directly (no worker, no torch, no
vLLM), which is why it sits below ``worker`` and above ``setup``. It must not start processes or import
torch or vLLM.
"""
