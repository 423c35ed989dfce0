"""Pipeline: the steps of one parity run, in order (devices, models, sides, captures, reference, compare), and the judged check around it."""
