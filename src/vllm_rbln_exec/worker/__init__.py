"""Worker processes: the parent side (``spawn``) and the child's entry (``main``).

Only plain data crosses the boundary: a JSON request file goes in, a capture
folder and a ``result.json`` come out, and progress travels as JSON lines.
"""
