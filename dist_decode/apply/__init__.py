"""Apply a trained run to a new cohort: ``python -m dist_decode.apply --run-dir RUN --store NEWSTORE --out OUT``.

The new cohort is packed with ``data_prep.pack`` as usual, onto the run's grid; nothing is packed here. Every fold
model of the run encodes every new subject (with the run's input normalisation, the new sites normalised from their
own volumes exactly like a held-out site), writes ``OUT/folds/<site>/features.h5`` (:mod:`dist_decode.contracts.
features`, ``split = "apply"``) and the healthy-twin maps of the new patients; then the maps are averaged over the
models, the RSA of the new cohort runs in each model's S and C spaces (when the store has the phenotypes), and the
analysis and the report are written. See docs/apply.md; the directory layout is owned by
:mod:`dist_decode.contracts.apply`.

Modules: :mod:`.pipeline` (the stages), :mod:`.__main__` (the CLI). The numbers are computed by
:mod:`dist_decode.analysis.apply` and rendered by :mod:`dist_decode.report.apply`.
"""
