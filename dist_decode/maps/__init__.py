"""Schizophrenia-specific maps: healthy-twin density/Jacobian maps, per-site group maps, the across-site overlap.

``python -m dist_decode.maps --run-dir RUN``; see ``docs/maps.md``. Modules: :mod:`.twins` (decode recon and
twin), :mod:`.density` (store grid and density units), :mod:`.jacobian` (ANTsPy SyN + log Jacobian),
:mod:`.group` (per-site test, threshold and extent),
:mod:`.overlap` (overlap, Dice, clusters, atlas labels), :mod:`.pipeline` (the stage on a run directory).
"""
from dist_decode.maps.group import GroupMap, fdr_bh, half_max_extent, one_sample_t, signflip_maxt, site_group_map
from dist_decode.maps.jacobian import SynSettings, log_jacobian
from dist_decode.maps.overlap import Atlas, cluster_table, dice, dice_matrix, overlap_count

__all__ = [
    "Atlas", "GroupMap", "SynSettings", "cluster_table", "dice", "dice_matrix", "fdr_bh", "half_max_extent",
    "log_jacobian",
    "one_sample_t", "overlap_count", "signflip_maxt", "site_group_map", "run_maps",
]


def run_maps(*args, **kwargs):
    """Run the maps stage; see :func:`dist_decode.maps.pipeline.run_maps`."""
    from dist_decode.maps.pipeline import run_maps as _run

    return _run(*args, **kwargs)
