"""Predictive distributions (and, in later milestones, calibration metrics and plots)."""

from bayesso.predict.predictive import Predictive, mc_predictive

__all__ = ["Predictive", "mc_predictive"]
