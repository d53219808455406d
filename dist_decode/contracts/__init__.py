"""The on-disk contracts between the stages, each with one owner module that every reader and writer uses.

* :mod:`.store` -- ``STORE/manifest.json`` (written by ``data_prep.pack``, read through :class:`dist_decode.data.Store`):
  schema version, sites, the sites that cannot be held out;
* :mod:`.run` -- a run directory: its identity (``manifest.json``: the store it is bound to, by hash) and its one
  ``config.json``, the fold folders and every stage's completion file;
* :mod:`.features` -- ``folds/<site>/features.h5``: the latent features of a fold's subjects;
* :mod:`.apply` -- an apply directory (``dist_decode.apply``): the run and the new store it is bound to, its models
  and every apply stage's completion file;
* :mod:`.calibration` -- ``benchmarks/calibration.json``: measured unit costs of every stage (written by
  ``benchmarks/bench_scale.py``, read by ``python -m launch.plan``).

``RUN/normalisation.h5`` is owned by :mod:`dist_decode.normalise`. docs/architecture.md describes every file.
"""
