"""The method contract: config dataclass, budget and ``distill`` entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from bench.config import check_range
from bench.errors import BudgetError

if TYPE_CHECKING:
    import optuna

    from bench.context import MethodContext
    from bench.data.types import TrainView
    from bench.synthetic import SyntheticSet


@dataclass(frozen=True)
class Budget:
    """``n_sequences`` sequences of at most ``seq_len`` items each."""

    n_sequences: int
    seq_len: int

    def __post_init__(self) -> None:
        check_range("budget", "n_sequences", self.n_sequences, low=1)
        check_range("budget", "seq_len", self.seq_len, low=2)

    def check_against(self, available: int, what: str = "training sequences") -> None:
        """Raise BudgetError if the budget asks for more sequences than exist."""
        if self.n_sequences > available:
            raise BudgetError(
                f"budget of {self.n_sequences} sequences exceeds the {available} {what} "
                f"in the data; choose a budget of at most {available}"
            )

    def label(self) -> str:
        return f"{self.n_sequences}x{self.seq_len}"


@dataclass(frozen=True)
class NoConfig:
    """Config of a method without hyperparameters."""


class Method:
    """Base class of registered methods.

    Subclasses set ``Config`` (a frozen dataclass whose field docs give each
    default and its source), ``family`` and ``version``, and implement
    :meth:`distill`. ``uses_budget`` is False only for the full-data reference.
    ``needs_expert`` and ``needs_representations`` let the runner build those
    shared inputs before the distill phase, so their amortised cost is not
    charged to the first cell that reads them.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    family: ClassVar[str] = "coreset"
    version: ClassVar[str] = "1"
    uses_budget: ClassVar[bool] = True
    needs_expert: ClassVar[bool] = False
    needs_representations: ClassVar[bool] = False

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def distill(self, train: "TrainView", budget: Budget | None, context: "MethodContext") -> "SyntheticSet":
        """Return the condensed training data for ``budget``."""
        raise NotImplementedError

    @classmethod
    def search_space(cls, trial: "optuna.Trial") -> dict[str, Any]:
        """Suggest config overrides for one Optuna trial ({} when nothing is tuned)."""
        return {}
