"""Worker processes: the parent side (``spawn``: start, watch, end) and the child's entry (``main``).

Only typed, versioned records cross the boundary: ``request.json`` (``setup.request.WorkerTask``) goes in,
a capture folder and a ``result.json`` come out, and progress travels as JSON lines.
"""
