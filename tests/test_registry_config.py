"""Registry lookups and typed config building."""

from dataclasses import dataclass

import pytest

from bench.config import build_config, check_range
from bench.errors import ConfigError, UnknownNameError
from bench.registry import get_method, method_names


def test_registry_lists_builtin_methods():
    names = method_names()
    assert "full" in names
    assert "random" in names


def test_registry_unknown_name_suggests_near_match():
    with pytest.raises(UnknownNameError, match="Did you mean 'random'"):
        get_method("randm")


@dataclass(frozen=True)
class _Example:
    steps: int = 10
    rate: float = 0.1
    flag: bool = False
    seeds: tuple[int, ...] = (0,)


def test_build_config_coerces_types():
    cfg = build_config(_Example, {"steps": "12", "rate": 1, "flag": "true", "seeds": "1,2"})
    assert cfg == _Example(steps=12, rate=1.0, flag=True, seeds=(1, 2))


def test_build_config_reads_one_number_as_list():
    assert build_config(_Example, {"seeds": 3}).seeds == (3,)


def test_build_config_unknown_key_near_match():
    with pytest.raises(ConfigError, match="Did you mean 'steps'"):
        build_config(_Example, {"stpes": 3})


@pytest.mark.parametrize("value", ["nan", "inf", float("nan"), float("-inf")])
def test_build_config_rejects_non_finite_numbers(value):
    with pytest.raises(ConfigError, match="rate must be a finite number"):
        build_config(_Example, {"rate": value})


def test_check_range_rejects_nan():
    with pytest.raises(ConfigError, match=r"invalid lr=nan; it must be a finite number > 0"):
        check_range("suite protocol", "lr", float("nan"), low=0, low_open=True)


def test_build_config_wrong_type_names_value():
    with pytest.raises(ConfigError, match="steps must be an integer, got 'many'"):
        build_config(_Example, {"steps": "many"})
