"""SyntheticSet: construction, exact save/load round trip and stored size."""

import numpy as np
import pytest
import torch

from bench.errors import ConfigError, DataError
from bench.synthetic import SyntheticSet, register_expander


@register_expander("test-outer")
def _outer(factors):
    return torch.einsum("mld,nd->mln", factors["z"], factors["items"])


def test_hard_from_sequences_left_pads_and_truncates():
    s = SyntheticSet.from_sequences([[1, 2, 3, 4], [5]], n_items=5, max_len=3)
    assert s.hard.tolist() == [[2, 3, 4], [0, 0, 5]]


def test_hard_roundtrip_exact(tmp_path):
    s = SyntheticSet.from_sequences([[1, 2, 3], [3, 2]], n_items=3, max_len=4, meta={"a": 1})
    s.save(tmp_path / "s.pt")
    loaded = SyntheticSet.load(tmp_path / "s.pt")
    assert np.array_equal(loaded.hard, s.hard)
    assert loaded.meta == {"a": 1}
    assert loaded.storage_bytes == 2 * 4 * 4


def test_soft_dense_roundtrip_exact(tmp_path):
    probs = torch.softmax(torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)), -1)
    s = SyntheticSet(kind="soft", n_items=7, soft=probs)
    s.save(tmp_path / "s.pt")
    loaded = SyntheticSet.load(tmp_path / "s.pt")
    assert torch.equal(loaded.soft_probs(), s.soft_probs())


def test_factored_storage_excludes_shared(tmp_path):
    z = torch.randn(2, 3, 4)
    items = torch.randn(9, 4)
    s = SyntheticSet(kind="soft", n_items=9, factors={"z": z, "items": items},
                     shared=("items",), expander="test-outer")
    assert s.storage_bytes == z.nelement() * 4
    s.save(tmp_path / "f.pt")
    loaded = SyntheticSet.load(tmp_path / "f.pt")
    assert torch.equal(loaded.soft_probs(), s.soft_probs())
    assert loaded.soft_probs().shape == (2, 3, 9)


def test_hard_decoding_of_soft_is_argmax_plus_one():
    probs = torch.zeros(1, 2, 3)
    probs[0, 0, 2] = 1
    probs[0, 1, 0] = 1
    s = SyntheticSet(kind="soft", n_items=3, soft=probs)
    assert s.hard_decoding().tolist() == [[3, 1]]
    assert s.to_item_ids(["a", "b", "c"]) == [["c", "a"]]


def test_hard_rejects_out_of_range_ids():
    with pytest.raises(DataError, match="outside 0..3"):
        SyntheticSet(kind="hard", n_items=3, hard=np.array([[1, 4]]))


def test_unknown_kind_rejected():
    with pytest.raises(ConfigError, match="kind"):
        SyntheticSet(kind="fuzzy", n_items=3)


def test_load_corrupt_file_raises(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="cannot read synthetic set"):
        SyntheticSet.load(path)
