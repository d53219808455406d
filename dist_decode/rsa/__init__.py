"""Representational similarity analysis with an exact, MPI-parallel permutation engine.

``python -m dist_decode.rsa --help`` for the CLI; :func:`run_rsa` for the Python API.
"""
from dist_decode.rsa.analysis import parse_variables, run_loso, run_rsa
from dist_decode.rsa.kendall import kendall, tau_a, tau_b

__all__ = ["run_rsa", "run_loso", "parse_variables", "kendall", "tau_a", "tau_b"]
