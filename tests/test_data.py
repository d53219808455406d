"""dist_decode.data: Store, LOSO splits, the lazy VolumeDataset, BalancedBatchSampler, resampling."""
from __future__ import annotations

import json
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dist_decode.data import BalancedBatchSampler, FoldSplit, Store, VolumeDataset, loso_split, resample_volume


@pytest.fixture(scope="module")
def store(tiny_store):
    return Store.open(tiny_store)


def test_store_metadata(store, tiny_store, tiny_cohort):
    m = json.loads((tiny_store / "manifest.json").read_text())
    assert store.sites == m["sites"] == ["siteA", "siteB", "siteC", "siteD"]
    assert store.n == sum(s["n"] for s in m["shards"]) == m["n_subjects"]
    assert store.grid_shape == (29, 35, 29)
    np.testing.assert_allclose(store.affine[:3], [[-6, 0, 0, 84], [0, 6, 0, -120], [0, 0, 6, -72]])
    assert store.mask.dtype == bool and store.mask.shape == store.grid_shape
    assert 0.1 < store.mask.mean() < 0.6
    assert store.ground_truth == tiny_cohort.resolve() / "ground_truth"
    # Row order: shards in manifest order, rows in shard order; phenotypes row-aligned.
    starts = np.cumsum([0] + [s["n"] for s in m["shards"]])
    for s, a, b in zip(m["shards"], starts[:-1], starts[1:]):
        assert set(store.site_of[a:b]) == {s["site"]}
    table = {ln.split("\t")[0]: ln.rstrip("\n").split("\t") for ln in (tiny_cohort / "participants.tsv").open()}
    header = table.pop("participant_id")
    for i in (0, 7, store.n - 1):
        row = dict(zip(header, table[store.participant_ids[i]]))
        assert store.phenotypes["diagnosis"][i] == row["diagnosis"]
        assert store.is_patient[i] == (row["diagnosis"] == "SZ")
        assert store.phenotypes["age"][i] == pytest.approx(float(row["age"]))
        if row["panss_total"] == "n/a":
            assert np.isnan(store.phenotypes["panss_total"][i])
    assert store.phenotypes["age"].dtype == np.float64
    assert {"tiv_ml", "iqr", "sex", "education_years"} <= set(store.phenotypes)
    assert np.isnan(store.phenotypes["panss_total"][~store.is_patient]).all()


def test_read_matches_nifti(store, tiny_cohort):
    for i in (0, store.n // 2, store.n - 1):
        pid = store.participant_ids[i]
        ref = np.asarray(nib.load(tiny_cohort / pid / "mri" / f"mwp1{pid}.nii.gz").dataobj, np.float32)
        vol = store.read(i)
        assert vol.dtype == np.float32
        np.testing.assert_array_equal(vol, ref)
    assert store.index_of(store.participant_ids[5]) == 5
    with pytest.raises(KeyError, match="sub-nobody"):
        store.index_of("sub-nobody")
    clone = pickle.loads(pickle.dumps(store))  # handles do not travel; the copy reopens its own
    np.testing.assert_array_equal(clone.read(1), store.read(1))
    store.close()
    np.testing.assert_array_equal(store.read(1), clone.read(1))  # reopens after close
    with pytest.raises(IndexError, match="out of range"):
        store.read(store.n)


def test_open_errors(tmp_path, tiny_store):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        Store.open(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_store, bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged store manifest"):
        Store.open(bad)
    m = json.loads((tiny_store / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "shards"}))
    with pytest.raises(ValueError, match="shards"):
        Store.open(bad)
    (bad / "manifest.json").write_text(json.dumps(m))
    (bad / m["shards"][1]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match=m["shards"][1]["file"]):
        Store.open(bad)
    # Opening through the manifest file itself works.
    assert Store.open(tiny_store / "manifest.json").n == m["n_subjects"]


def test_loso_split_partitions_and_is_deterministic(store):
    for fold, site in enumerate(store.sites):
        sp = loso_split(store, fold, val_fraction=0.15, seed=3)
        assert isinstance(sp, FoldSplit) and sp.fold == fold and sp.site == site
        allidx = np.concatenate([sp.train, sp.val, sp.test])
        assert sorted(allidx.tolist()) == list(range(store.n))  # a partition
        assert set(store.site_of[sp.test]) == {site}
        assert site not in set(store.site_of[sp.train]) | set(store.site_of[sp.val])
        # stratified: both groups in validation, and from several sites
        assert store.is_patient[sp.val].any() and (~store.is_patient[sp.val]).any()
        assert len(set(store.site_of[sp.val])) >= 2
        again = loso_split(store, fold, val_fraction=0.15, seed=3)
        np.testing.assert_array_equal(sp.val, again.val)
        np.testing.assert_array_equal(sp.train, again.train)
    vals = {tuple(loso_split(store, 0, seed=s).val) for s in range(6)}
    assert len(vals) > 1  # the seed matters
    assert loso_split(store, 1, val_fraction=0.0).val.size == 0
    with pytest.raises(ValueError, match=r"fold 4 out of range.*0\.\.3"):
        loso_split(store, 4)
    with pytest.raises(ValueError, match="out of range"):
        loso_split(store, -1)


def test_volume_dataset_and_workers(store, tiny_store):
    split = loso_split(store, 0)
    ds = VolumeDataset(tiny_store, split.train)
    assert len(ds) == split.train.size
    item = ds[3]
    assert item["x"].dtype == torch.float32 and tuple(item["x"].shape) == (1, *store.grid_shape)
    assert item["index"] == split.train[3] and item["patient"] == bool(store.is_patient[split.train[3]])
    np.testing.assert_array_equal(item["x"][0].numpy(), store.read(split.train[3]))
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2._store is None  # nothing process-bound travels
    torch.testing.assert_close(ds2[3]["x"], item["x"])
    np.testing.assert_array_equal(ds.is_patient, store.is_patient[split.train])

    small = VolumeDataset(tiny_store, split.train, grid=(16, 16, 16))
    assert tuple(small[0]["x"].shape) == (1, 16, 16, 16)

    # Worker processes open the shards themselves (after the parent has read, so a handle exists).
    sampler = BalancedBatchSampler(ds.is_patient, batch_size=4, seed=5, steps=3)
    serial = [b["index"].tolist() for b in DataLoader(ds, batch_sampler=sampler, num_workers=0)]
    parallel = [b for b in DataLoader(ds, batch_sampler=sampler, num_workers=2)]
    assert [b["index"].tolist() for b in parallel] == serial
    for b in parallel:
        assert b["x"].shape == (4, 1, *store.grid_shape)
        assert b["patient"].tolist() == [True, True, False, False]

    # DistributedSampler: the ranks' shards of the dataset cover it.
    seen = []
    for rank in range(2):
        ds_sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        for b in DataLoader(ds, sampler=ds_sampler, batch_size=5):
            seen.extend(b["index"].tolist())
    assert set(seen) == set(split.train.tolist())
    with pytest.raises(IndexError):
        VolumeDataset(tiny_store, [store.n])


def test_balanced_batch_sampler_contract():
    flags = np.array([True] * 7 + [False] * 11)
    rng = np.random.default_rng(0)
    rng.shuffle(flags)
    s = BalancedBatchSampler(flags, batch_size=4, seed=9, steps=10)
    batches = list(s)
    assert len(s) == len(batches) == 10
    for b in batches:
        assert len(b) == 4 and flags[b].sum() == 2
    assert len({tuple(b) for b in batches}) > 5
    # Restart at any step continues the identical sequence; steps counts the batches yielded.
    resumed = BalancedBatchSampler(flags, 4, 9, start_step=6, steps=4)
    assert len(resumed) == 4 and list(resumed) == batches[6:]
    assert list(BalancedBatchSampler(flags, 4, 9, start_step=3, steps=2)) == batches[3:5]
    # The global batch depends only on the global batch size, not the world size.
    one = list(BalancedBatchSampler(flags, 8, 9, steps=5))
    for step in range(5):
        ranks = [list(BalancedBatchSampler(flags, 4, 9, rank=r, world_size=2, steps=5))[step] for r in range(2)]
        assert sorted(ranks[0] + ranks[1]) == sorted(one[step])
        for rb in ranks:
            assert flags[rb].sum() == 2
    # One epoch of patients by default.
    assert len(BalancedBatchSampler(flags, 4, 0)) == int(np.ceil(7 / 2))
    assert len(BalancedBatchSampler(flags, 4, 0, world_size=2, rank=1)) == int(np.ceil(7 / 4))
    # A group smaller than the half batch is drawn with replacement.
    big = list(BalancedBatchSampler(flags, 20, 1, steps=2))
    assert all(len(b) == 20 and flags[b].sum() == 10 for b in big)
    with pytest.raises(ValueError, match="even"):
        BalancedBatchSampler(flags, 3, 0)
    with pytest.raises(ValueError, match="controls"):
        BalancedBatchSampler(np.ones(5, bool), 2, 0)
    with pytest.raises(ValueError, match="rank"):
        BalancedBatchSampler(flags, 2, 0, rank=2, world_size=2)


def test_resample_volume():
    vol = np.random.default_rng(0).random((29, 35, 29)).astype(np.float32)
    out = resample_volume(vol, (16, 16, 16))
    assert isinstance(out, np.ndarray) and out.shape == (16, 16, 16) and out.dtype == np.float32
    assert abs(out.mean() - vol.mean()) < 0.02
    t = torch.from_numpy(vol)[None, None]
    tout = resample_volume(t, (64, 64, 64))
    assert isinstance(tout, torch.Tensor) and tuple(tout.shape) == (1, 1, 64, 64, 64)
    const = np.full((10, 12, 9), 0.5, np.float32)
    np.testing.assert_allclose(resample_volume(const, (7, 7, 7)), 0.5, rtol=1e-6)
    assert resample_volume(vol, vol.shape) is vol
    with pytest.raises(ValueError):
        resample_volume(np.zeros((3, 3)), (2, 2, 2))
