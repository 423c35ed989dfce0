"""Strict JSON values and the atomic writer every report goes through."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vllm_rbln_exec.core.jsonio import strict_json, write_json_atomic


def test_strict_json_keeps_plain_values_and_nulls_non_finite_ones():
    data = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": (np.float32(0.25), np.int64(3)), 4: True,
            "p": Path("/x/y")}
    assert strict_json(data) == {"a": None, "b": [None, None, 1.5], "c": [0.25, 3], "4": True, "p": "/x/y"}


def test_an_unexpected_type_is_written_as_text_not_lost():
    class Odd:
        def __str__(self):
            return "odd"

    assert strict_json({"x": Odd()}) == {"x": "odd"}


def test_write_json_atomic_writes_strict_json_and_leaves_no_temporary(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "r.json", {"kl": math.nan, "v": np.float64(2.0)})
    assert json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))) == {
        "kl": None, "v": 2.0}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
