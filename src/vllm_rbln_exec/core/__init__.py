"""Core: exit codes and errors, strict JSON, registries, typed records, dtype names. Imports nothing else of the package."""
