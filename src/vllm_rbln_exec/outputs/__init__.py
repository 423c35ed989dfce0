"""Outputs: the terminal report and the JSON/JUnit/Markdown files, all made from a run's saved form."""
