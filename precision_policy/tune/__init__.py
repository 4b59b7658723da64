"""Accuracy-aware tuning (``pp.tune``): convert a model, fall ops back until its metric is tolerable.

See :func:`precision_policy.tune.search.tune` for the search, :mod:`precision_policy.tune.adapter`
for the backend protocol and :mod:`precision_policy.tune.result` for what it returns and saves.
This package imports no framework; a backend is imported when a model needs it.
"""

from precision_policy.errors import TuneError
from precision_policy.tune.adapter import Candidate, Sensitivity, Skipped, TuneAdapter
from precision_policy.tune.result import Trial, TuneResult, load_trials
from precision_policy.tune.search import adapter_for, tune

__all__ = ["Candidate", "Sensitivity", "Skipped", "Trial", "TuneAdapter", "TuneError", "TuneResult", "adapter_for",
           "load_trials", "tune"]
