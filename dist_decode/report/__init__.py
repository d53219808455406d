"""The fold report: ``python -m dist_decode.report --run-dir RUN`` writes ``RUN/report/`` (see docs/report.md)."""


def build_report(*args, **kwargs):
    """Build the report; see :func:`dist_decode.report.build.build_report`."""
    from dist_decode.report.build import build_report as _build

    return _build(*args, **kwargs)


__all__ = ["build_report"]
