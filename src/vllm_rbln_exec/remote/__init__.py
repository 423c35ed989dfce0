"""A side that is a running OpenAI-compatible server, captured by an HTTP client instead of a worker process.

``client`` speaks HTTP (httpx: a total deadline and a size cap per request, retries with backoff, the API
key), ``probe`` asks the server what it is and, on a short prompt, exactly what the capture will ask, before
anything starts (``advice`` says what a refusing server does take), ``rows`` turns its logprobs into capture rows and ``capture``
writes a capture folder in the store's format (``capture.store``), so comparing, judging and reporting work
on it unchanged. Plain HTTP and numpy: the main process runs all of it directly (no worker, no torch, no
vLLM), which is why it sits below ``worker`` and above ``setup``. It must not start processes or import
torch or vLLM.
"""
