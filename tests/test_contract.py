"""Contract test run against every registered method on a real data slice."""

import numpy as np
import pytest
import torch

from bench.errors import BudgetError, LeakageError
from bench.method import Budget
from bench.registry import build_method, get_method, method_names
from bench.synthetic import SyntheticSet
from tests.conftest import method_context


def _context(cache, seed=0):
    return method_context(cache, seed)


def _tiny_overrides(name):
    # Methods declare a fast configuration for contract tests; None means defaults.
    cls = get_method(name)
    return getattr(cls, "test_overrides", {}) or {}


@pytest.mark.parametrize("name", method_names())
def test_method_returns_valid_set(name, steam_cache, tmp_path):
    method = build_method(name, _tiny_overrides(name))
    budget = Budget(5, 10) if method.uses_budget else None
    out = method.distill(steam_cache.data.train_view(), budget, _context(steam_cache))
    assert isinstance(out, SyntheticSet)
    assert out.n_items == steam_cache.data.n_items
    if budget is not None:
        assert out.n_sequences == budget.n_sequences
        assert out.seq_len <= budget.seq_len
    assert out.storage_bytes > 0
    out.save(tmp_path / "set.pt")
    loaded = SyntheticSet.load(tmp_path / "set.pt")
    assert np.array_equal(loaded.hard_decoding(), out.hard_decoding())
    if out.kind == "soft":
        assert torch.equal(loaded.soft_probs(), out.soft_probs())


@pytest.mark.parametrize("name", method_names())
def test_method_is_seeded(name, steam_cache):
    method = build_method(name, _tiny_overrides(name))
    budget = Budget(4, 8) if method.uses_budget else None
    a = method.distill(steam_cache.data.train_view(), budget, _context(steam_cache, seed=1))
    b = build_method(name, _tiny_overrides(name)).distill(
        steam_cache.data.train_view(), budget, _context(steam_cache, seed=1)
    )
    assert np.array_equal(a.hard_decoding(), b.hard_decoding())


@pytest.mark.parametrize("name", method_names())
def test_method_budget_larger_than_data_fails_clearly(name, steam_cache):
    method = build_method(name, _tiny_overrides(name))
    if not method.uses_budget:
        pytest.skip("full data takes no budget")
    with pytest.raises(BudgetError, match="exceeds"):
        method.distill(steam_cache.data.train_view(), Budget(10_000, 10), _context(steam_cache))


@pytest.mark.parametrize("name", method_names())
def test_method_config_is_frozen_dataclass(name):
    import dataclasses

    cls = get_method(name)
    assert dataclasses.is_dataclass(cls.Config)
    config = cls.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        for field in dataclasses.fields(config):
            setattr(config, field.name, None)
        raise dataclasses.FrozenInstanceError("no fields")


def test_train_view_hides_targets(steam_cache):
    with pytest.raises(LeakageError):
        steam_cache.data.train_view().valid_targets
