"""engines.vllm_engine.flat_to_arrays on a stand-in shaped like vLLM's FlatLogprobs.

Per position vLLM stores the sampled token first, then the requested entries in rank
order (the sampled token may appear again among them). Importing vLLM itself takes
seconds, so a plain object with the same four lists is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from vllm_rbln_exec.engines.vllm_engine import flat_to_arrays

NEG_INF = -np.inf
SENTINEL = 99.0  # the sampled token's own slot: must never reach the output


@dataclass
class FakeFlatLogprobs:
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def append(self, sampled: int, ranked: list[tuple[int, float]]) -> None:
        self.start_indices.append(len(self.logprobs))
        for token_id, lp in [(sampled, SENTINEL), *ranked]:
            self.token_ids.append(token_id)
            self.logprobs.append(lp)
        self.end_indices.append(len(self.logprobs))


# two positions over a vocabulary of 5; position 1's sampled token (4, forced) is not its argmax
POSITIONS = [
    (2, [(2, -0.1), (0, -1.5), (4, -2.0), (1, -3.0), (3, -6.0)]),
    (4, [(0, -0.2), (4, -1.8), (3, -2.5), (2, -4.0), (1, -7.25)]),
]


def make_flat(positions=POSITIONS, keep: int | None = None) -> FakeFlatLogprobs:
    flat = FakeFlatLogprobs()
    for sampled, ranked in positions:
        flat.append(sampled, ranked if keep is None else ranked[:keep])
    return flat


def test_full_mode_dense_rows():
    rows, ids = flat_to_arrays(make_flat(), vocab_size=5, topn=None)
    assert ids is None
    assert rows.dtype == np.float32 and rows.shape == (2, 5)
    expected = np.array(
        [
            [-1.5, -3.0, -0.1, -6.0, -2.0],
            [-0.2, -7.25, -4.0, -2.5, -1.8],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(rows, expected)
    assert np.isfinite(rows).all()  # every id placed
    assert SENTINEL not in rows
    assert rows.argmax(axis=1).tolist() == [2, 0]


def test_top_n_mode_values_and_ids_in_rank_order():
    vals, ids = flat_to_arrays(make_flat(keep=2), vocab_size=5, topn=2)
    assert vals.dtype == np.float32 and ids.dtype == np.int32
    assert vals.shape == ids.shape == (2, 2)
    assert ids.tolist() == [[2, 0], [0, 4]]
    np.testing.assert_array_equal(vals, np.array([[-0.1, -1.5], [-0.2, -1.8]], dtype=np.float32))
    assert SENTINEL not in vals


def test_top_n_mode_with_the_sampled_token_outside_the_top_n():
    vals, ids = flat_to_arrays(make_flat(keep=1), vocab_size=5, topn=1)
    assert ids.tolist() == [[2], [0]]  # position 1 sampled 4, which is not its top-1
    np.testing.assert_array_equal(vals, np.array([[-0.1], [-0.2]], dtype=np.float32))


@pytest.mark.parametrize("topn", [None, 3])
def test_no_positions(topn):
    vals, ids = flat_to_arrays(FakeFlatLogprobs(), vocab_size=5, topn=topn)
    assert vals.shape == (0, 5 if topn is None else 3)
    assert (ids is None) == (topn is None)


def test_wrong_entry_count_is_refused():
    with pytest.raises(RuntimeError, match="expected 5"):
        flat_to_arrays(make_flat(keep=3), vocab_size=5, topn=None)
    with pytest.raises(RuntimeError, match="expected 2"):
        flat_to_arrays(make_flat(keep=3), vocab_size=5, topn=2)
