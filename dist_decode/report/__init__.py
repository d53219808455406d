"""The report: ``python -m dist_decode.report --run-dir RUN`` renders ``RUN/report/`` (see docs/report.md).

:mod:`.build` gathers what the stages wrote (the numbers come from :mod:`dist_decode.analysis`), :mod:`.figures`
draws the figures, ``templates/report.html.j2`` is the page.
"""
from dist_decode.report.build import build_report

__all__ = ["build_report"]
