"""Stochastic trace and log-determinant estimators, each with its exact sibling.

Trace estimators (:mod:`flowmath.estimators.trace`) see a matrix through ``matvec(V)`` (vectors
as rows); log-det estimators for residual blocks (:mod:`flowmath.estimators.logdet`) see a batch
of Jacobians through ``vjp(V)`` (row ``i`` for sample ``i``). See docs/design.rst (Estimators).
"""

from .logdet import (
    DISTRIBUTIONS,
    RouletteEstimate,
    SeriesMoments,
    check_roulette_cap,
    choose_n_terms,
    exact_logdet,
    neumann_logdet,
    power_series_bias_std,
    power_series_logdet,
    power_series_partial_sums,
    roulette_logdet,
    roulette_std,
    roulette_survival,
    series_truncation_bound,
)
from .trace import (
    PROBES,
    draw_probes,
    exact_trace,
    hutchinson_trace,
    hutchinson_variance,
    hutchpp_trace,
)

__all__ = [
    "DISTRIBUTIONS",
    "PROBES",
    "RouletteEstimate",
    "SeriesMoments",
    "check_roulette_cap",
    "choose_n_terms",
    "draw_probes",
    "exact_logdet",
    "exact_trace",
    "hutchinson_trace",
    "hutchinson_variance",
    "hutchpp_trace",
    "neumann_logdet",
    "power_series_bias_std",
    "power_series_logdet",
    "power_series_partial_sums",
    "roulette_logdet",
    "roulette_std",
    "roulette_survival",
    "series_truncation_bound",
]
