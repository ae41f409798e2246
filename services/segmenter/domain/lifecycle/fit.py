"""What a maximum-likelihood fit returns: the parameters plus the diagnostics to trust them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

P = TypeVar("P")


@dataclass(frozen=True)
class ModelFit(Generic[P]):
    params: P
    log_likelihood: float
    iterations: int
    function_evaluations: int
    converged: bool
    message: str
    n_customers: int
    method: str

    def as_json(self) -> dict[str, Any]:
        """Parameters and diagnostics, ready for an API response."""
        return {
            "params": dict(vars(self.params)),
            "log_likelihood": self.log_likelihood,
            "iterations": self.iterations,
            "function_evaluations": self.function_evaluations,
            "converged": self.converged,
            "message": self.message,
            "n_customers": self.n_customers,
            "method": self.method,
        }
