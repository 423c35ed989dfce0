"""Worker processes: starting, watching and ending them (spawn, parent side) and the worker's own main (child side)."""
