"""dist_decode.normalise: statistics against a direct numpy/scipy computation, the torch transform, the run file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from nibabel.affines import voxel_sizes
from scipy import ndimage

from dist_decode import normalise
from dist_decode.data import Store
from dist_decode.normalise import Normaliser, NormaliseSettings, gaussian_kernels, smooth


def _reference(store: Store, fwhm: float, controls_only: bool = False) -> dict:
    """The four steps done by hand with scipy, volume by volume (site gains and means from every subject, or from
    each site's controls)."""
    vox = voxel_sizes(store.affine)
    sigma = [fwhm / (2 * np.sqrt(2 * np.log(2))) / v for v in vox]
    tiv = np.asarray(store.phenotypes["tiv_ml"], float)
    ref = np.median(tiv)
    vols = np.stack([ndimage.gaussian_filter(store.read(i).astype(np.float64), sigma, mode="constant", truncate=4.0)
                     * ref / tiv[i] for i in range(store.n)])
    sites = list(store.sites)
    site = np.array([sites.index(s) for s in store.site_of])
    mask = store.mask
    use = ~np.asarray(store.is_patient, bool) if controls_only else np.ones(store.n, bool)
    totals = vols[:, mask].sum(1)
    site_tot = np.array([totals[use & (site == k)].mean() for k in range(len(sites))])
    gain = site_tot / site_tot.mean()
    vols /= gain[site][:, None, None, None]
    means = np.stack([vols[use & (site == k)].mean(0) for k in range(len(sites))])
    centred = vols - means[site]
    scale = np.sqrt((centred[:, mask] ** 2).mean())
    return {"vols": vols, "means": means, "gain": gain, "scale": scale, "z": centred / scale, "site": site}


def test_statistics_match_a_direct_computation(tiny_store):
    store = Store.open(tiny_store)
    norm = Normaliser.compute(store, NormaliseSettings(smooth_fwhm_mm=10.0, site_reference="all"), progress=False)
    ref = _reference(store, 10.0)
    assert norm.sites == list(store.sites)
    np.testing.assert_allclose(norm.site_gain, ref["gain"], rtol=1e-6)
    np.testing.assert_allclose(norm.site_mean, ref["means"], atol=1e-6)
    assert norm.scale == pytest.approx(ref["scale"], rel=1e-6)
    # the torch transform of raw volumes is the same normalisation
    z = norm.transform()(torch.from_numpy(np.stack([store.read(i) for i in range(store.n)]))[:, None],
                         torch.from_numpy(norm.factor), torch.from_numpy(norm.site_index))[:, 0].numpy()
    np.testing.assert_allclose(z, ref["z"], rtol=1e-4, atol=2e-5)  # float32 convolutions
    mask = store.mask
    for k in range(len(norm.sites)):  # every site is centred on its own mean: no site offset left
        assert np.abs(z[ref["site"] == k][:, mask].mean(0)).max() < 1e-4
    assert z[:, mask].std() == pytest.approx(1.0, rel=1e-3)
    # and back to density units of the subject's site
    for i in (0, store.n - 1):
        np.testing.assert_allclose(norm.density(z[i], int(norm.site_index[i])), ref["vols"][i] * ref["gain"][ref["site"][i]],
                                   atol=1e-5)


def test_controls_as_each_sites_reference_and_the_fallback_for_a_site_with_too_few(tiny_store, tmp_path,
                                                                                     monkeypatch):
    store = Store.open(tiny_store)
    settings = NormaliseSettings(smooth_fwhm_mm=10.0, site_reference="controls")
    norm = Normaliser.compute(store, settings, progress=False)
    ref = _reference(store, 10.0, controls_only=True)
    np.testing.assert_allclose(norm.site_gain, ref["gain"], rtol=1e-6)
    np.testing.assert_allclose(norm.site_mean, ref["means"], atol=1e-6)
    assert norm.scale == pytest.approx(ref["scale"], rel=1e-6)  # the spread about the controls' mean, everyone
    assert norm.sites_referenced_on_all == []
    # the controls of a site are centred on zero, its patients keep their mean difference from them
    z = norm.transform()(torch.from_numpy(np.stack([store.read(i) for i in range(store.n)]))[:, None],
                         torch.from_numpy(norm.factor), torch.from_numpy(norm.site_index))[:, 0].numpy()
    np.testing.assert_allclose(z, ref["z"], rtol=1e-4, atol=2e-5)
    hc = ~np.asarray(store.is_patient, bool)
    for k in range(len(norm.sites)):
        assert np.abs(z[hc & (ref["site"] == k)][:, store.mask].mean(0)).max() < 1e-4
    path = norm.save(tmp_path / "n.h5")
    back = Normaliser.load(path)
    assert back.settings == settings and back.sites_referenced_on_all == []
    # too few controls at a site (here: every site, with the bar raised): all its subjects, named and recorded
    monkeypatch.setattr(normalise, "MIN_REFERENCE", 6)
    fell = Normaliser.compute(store, settings, progress=False)
    every = Normaliser.compute(store, NormaliseSettings(smooth_fwhm_mm=10.0, site_reference="all"), progress=False)
    assert fell.sites_referenced_on_all == list(store.sites)
    np.testing.assert_allclose(fell.site_mean, every.site_mean, atol=1e-6)
    np.testing.assert_allclose(fell.site_gain, every.site_gain, rtol=1e-9)
    assert Normaliser.load(fell.save(tmp_path / "f.h5")).sites_referenced_on_all == list(store.sites)
    with pytest.raises(ValueError, match="data.site_reference"):
        Normaliser.compute(store, NormaliseSettings(site_reference="patients"), progress=False)


def test_uneven_patient_shares_under_all_subjects_centring_are_warned_about(tiny_store, monkeypatch, caplog):
    store = Store.open(tiny_store)  # about half patients at every site: nothing to warn about
    sz, site = np.asarray(store.is_patient, bool), np.asarray(store.site_of).astype(str)
    share = [100 * sz[site == s].mean() for s in store.sites]
    with caplog.at_level("WARNING", logger="dist_decode.normalise"):
        Normaliser.compute(store, NormaliseSettings(site_reference="all"), progress=False)
    assert "shares of patients" not in caplog.text
    monkeypatch.setattr(normalise, "UNEVEN_SHARE", -0.01)  # any spread counts
    with caplog.at_level("WARNING", logger="dist_decode.normalise"):
        Normaliser.compute(store, NormaliseSettings(site_reference="all"), progress=False)
        assert f"from {min(share):.0f} % to {max(share):.0f} %" in caplog.text and "data.site_reference=controls" in caplog.text
        caplog.clear()
        Normaliser.compute(store, NormaliseSettings(site_reference="controls"), progress=False)
    assert "shares of patients" not in caplog.text


def test_gain_removes_a_scanner_scale_and_tiv_scaling_removes_head_size(tiny_store):
    store = Store.open(tiny_store)
    settings = NormaliseSettings(smooth_fwhm_mm=0.0)
    norm = Normaliser.compute(store, settings, progress=False)
    tiv = np.asarray(store.phenotypes["tiv_ml"], float)
    np.testing.assert_allclose(norm.factor * norm.site_gain[norm.site_index], np.median(tiv) / tiv)
    # doubling every volume of one site changes that site's gain, and nothing the model sees
    z1 = norm.transform()(torch.from_numpy(store.read(0))[None, None], torch.tensor([norm.factor[0]]),
                          torch.tensor([norm.site_index[0]]))
    k = int(norm.site_index[0])
    doubled = Normaliser(settings, norm.sites, norm.site_mean * 1.0, norm.site_gain.copy(), norm.reference,
                         norm.scale, norm.participant_id, norm.factor / 2, norm.site_index, norm.voxel_mm,
                         norm.store_hash)
    z2 = doubled.transform()(torch.from_numpy(2 * store.read(0))[None, None], torch.tensor([doubled.factor[0]]),
                             torch.tensor([k]))
    torch.testing.assert_close(z1, z2)


def test_smoothing_kernel_matches_scipy():
    rng = np.random.default_rng(0)
    vol = rng.random((15, 17, 13)).astype(np.float32)
    for fwhm, vox in ((8.0, (3.0, 3.0, 3.0)), (6.0, (1.5, 2.0, 2.5))):
        sigma = [fwhm / (2 * np.sqrt(2 * np.log(2))) / v for v in vox]
        want = ndimage.gaussian_filter(vol.astype(np.float64), sigma, mode="constant", truncate=4.0)
        got = smooth(torch.from_numpy(vol)[None, None], gaussian_kernels(fwhm, vox))[0, 0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_run_file_is_computed_once_and_bound_to_store_and_settings(tiny_store, tmp_path):
    store = Store.open(tiny_store)
    settings = NormaliseSettings(smooth_fwhm_mm=6.0)
    a = normalise.ensure(tmp_path, store, settings, progress=False)
    stamp = (tmp_path / normalise.FILE).stat().st_mtime_ns
    b = normalise.ensure(tmp_path, store, settings, progress=False)
    assert (tmp_path / normalise.FILE).stat().st_mtime_ns == stamp  # read, not recomputed
    np.testing.assert_array_equal(a.site_mean, b.site_mean)
    assert a.scale == b.scale and list(a.participant_id) == list(store.participant_ids)
    with pytest.raises(ValueError, match="computed with"):
        normalise.ensure(tmp_path, store, NormaliseSettings(smooth_fwhm_mm=4.0), progress=False)
    other = tmp_path / "other_store"
    shutil.copytree(tiny_store, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "another day"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another store"):
        normalise.ensure(tmp_path, Store.open(other), settings, progress=False)


def test_missing_tiv_is_named(tiny_store):
    store = Store.open(tiny_store)
    store.phenotypes["tiv_ml"][3] = np.nan
    pid = store.participant_ids[3]
    with pytest.raises(ValueError, match=f"no TIV.*{pid}.*proportional_scaling"):
        Normaliser.compute(store, NormaliseSettings(), progress=False)
    # total grey matter needs no TIV
    norm = Normaliser.compute(store, NormaliseSettings(proportional_scaling="gm", smooth_fwhm_mm=0.0), progress=False)
    assert np.isfinite(norm.factor).all()


def test_settings_are_validated():
    with pytest.raises(ValueError, match="proportional_scaling"):
        NormaliseSettings(proportional_scaling="icv").validate()
    with pytest.raises(ValueError, match="smooth_fwhm_mm"):
        NormaliseSettings(smooth_fwhm_mm=-1).validate()
    assert not NormaliseSettings("none", 0.0, False, False).active


def test_another_store_in_a_runs_units_is_normalised_like_its_held_out_sites(tiny_store, tmp_path):
    """Normaliser.applied_to: a site's mean and gain come from its own volumes and the run's reference, scale and
    mean site total, so the run's own store gets back exactly the run's statistics; older files without the recorded
    mean site total recover it from the site means."""
    store = Store.open(tiny_store)
    norm = Normaliser.compute(store, NormaliseSettings(), progress=False)
    assert norm.site_total_mean > 0
    norm.save(tmp_path / "n.h5")
    assert Normaliser.load(tmp_path / "n.h5").site_total_mean == pytest.approx(norm.site_total_mean)
    old = Normaliser.load(tmp_path / "n.h5")
    old.site_total_mean = None
    assert old.run_site_total_mean(store.mask) == pytest.approx(norm.site_total_mean, rel=1e-5)
    again = old.applied_to(store, store.mask, progress=False)
    np.testing.assert_allclose(again.site_gain, norm.site_gain, rtol=1e-5)
    np.testing.assert_allclose(again.factor, norm.factor, rtol=1e-5)
    np.testing.assert_allclose(again.site_mean, norm.site_mean, rtol=1e-4, atol=1e-6)
    assert (again.reference, again.scale) == (norm.reference, norm.scale)


def test_a_full_disk_while_saving_fails_clearly_without_a_crash(tiny_store, tmp_path):
    """A real ENOSPC (a private tmpfs, tests/small_fs.py) while the statistics are written: DiskFull naming the
    file, no temporary file left, and a clean exit (HDF5 2.0 segfaulted at exit when its chunk cache held the
    chunk whose write failed)."""
    import os
    import sys
    from pathlib import Path

    from small_fs import run_on_small_fs

    src = Normaliser.compute(Store.open(tiny_store), NormaliseSettings(), progress=False).save(tmp_path / "n.h5")
    code = (f"from dist_decode.normalise import Normaliser\nfrom dist_decode.fsutil import DiskFull\n"
            f"try:\n    Normaliser.load({str(src)!r}).save('{tmp_path / 'fs'}/n.h5')\n"
            f"except DiskFull as exc:\n    print(exc)\n")
    res = run_on_small_fs(tmp_path / "fs", f"""
        leave {src.stat().st_size // 2}
        {sys.executable} -c "{code}"; echo "rc=$?"
        ls -A $FS | grep -v '^.filler$' || true
    """, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")
    assert lines[0].startswith(f"disk full: could not write the normalisation statistics {tmp_path / 'fs'}/n.h5 "
                               "(No space left on device"), res.stdout + res.stderr[-2000:]
    assert lines[1:] == ["rc=0", ""], res.stdout + res.stderr[-2000:]  # and nothing left in $FS


def test_the_default_site_reference_is_the_controls_in_the_config_and_in_the_settings():
    """docs/science.md: the controls as each site's reference raised S~specific on every planted cohort."""
    from dist_decode.config import RunConfig, profile_config

    assert NormaliseSettings().site_reference == "controls"
    for cfg in (RunConfig(), profile_config("cpu"), profile_config("gpu")):
        assert NormaliseSettings.from_config(cfg.data) == NormaliseSettings()


def test_runs_from_before_the_site_reference_keep_all_subjects_as_reference(tiny_store, tmp_path):
    """A run's config.json and normalisation.h5 written before data.site_reference existed were centred on all of
    each site's subjects: read back, they say so (not today's default), so resuming or applying such a run
    reproduces its inputs instead of refusing or silently changing them."""
    import h5py

    from dist_decode.config import RunConfig
    from dist_decode.contracts.run import RunDir

    run = tmp_path / "old_run"
    run.mkdir()
    saved = RunConfig().to_dict()
    del saved["data"]["site_reference"]
    (run / "config.json").write_text(json.dumps(saved))
    assert RunDir(run).config().data.site_reference == "all"
    assert RunConfig.from_dict(saved).data.site_reference == "controls"  # a user's partial config: today's default
    path = Normaliser.compute(Store.open(tiny_store), NormaliseSettings(site_reference="all"),
                              progress=False).save(tmp_path / "n.h5")
    with h5py.File(path, "r+") as f:
        s = json.loads(f.attrs["settings"])
        del s["site_reference"]
        f.attrs["settings"] = json.dumps(s)
    assert Normaliser.load(path).settings == NormaliseSettings(site_reference="all")
