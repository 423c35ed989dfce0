"""Captures: the on-disk format of one side's logprobs (with digests), q16 storage, and the reference cache."""
