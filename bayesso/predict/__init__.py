"""Predictive distributions (MC, linearized, probit), calibration metrics, temperature scaling and plots."""

from bayesso.predict.linearized import linearized_outputs, linearized_predictive, probit_predictive
from bayesso.predict.monte_carlo import mc_predictive
from bayesso.predict.predictive import Predictive

__all__ = ["Predictive", "linearized_outputs", "linearized_predictive", "mc_predictive", "probit_predictive"]
