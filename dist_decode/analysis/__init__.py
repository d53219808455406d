"""Analyses of a finished run: numbers the report renders (recovery of planted truth, ...)."""
