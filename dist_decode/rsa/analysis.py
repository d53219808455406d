"""RSA of feature spaces against phenotype model RDMs with one subject-label permutation family.

:func:`run_rsa` analyses one set of subjects (one scope, a full RDM over all subjects; permutation
within strata optional). :func:`run_loso` analyses the held-out subjects of every LOSO fold: one scope per
held-out site (each site's features come from its own fold model) and a ``pooled`` scope whose statistic
is the sum of the per-site numerators ``S`` (a stratified Kendall tau over within-site cells; cross-site
distances between different fold models carry no meaning). Both share the machinery below: every test
(scope x space x variable) sees the same subject relabelling in each permutation, restricted to the
subjects it uses, so max-T / minP family-wise correction is valid.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dist_decode.rsa import fwe as fwe_mod
from dist_decode.rsa.kendall import CategoricalEngine, GradedEngine, kendall, make_engine, model_vector
from dist_decode.rsa.permutation import block_rng, block_sizes, perm_block, restrict, run_blocks, strata_segments
from dist_decode.rsa.rdm import feature_rdm, missing_mask, model_values, subset_rdm

log = logging.getLogger(__name__)

#: Seed paper's criterion for a "marked" effect: |tau_a| > MARK_TAU and p < MARK_P.
MARK_TAU = 0.025
MARK_P = 0.01
#: Fewest subjects a model needs to be tested.
MIN_SUBJECTS = 4


@dataclass
class Column:
    """One tested (scope, space, variable) and, for pooled columns, the per-site tests it sums."""

    scope: str
    space: str
    variable: str
    kind: str
    n: int
    n_pairs: int
    tau_b_den: float
    observed: int
    engine: GradedEngine | CategoricalEngine | None = None
    members: np.ndarray | None = None
    parts: list[int] = field(default_factory=list)


def parse_variables(spec: str | list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """``"age:continuous,sex:categorical"`` (or a list of ``name:kind``) -> ``[(name, kind), ...]``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise ValueError(f"variable {item!r}: expected name:kind with kind continuous or categorical")
        name, kind = item.rsplit(":", 1)
        if kind not in ("continuous", "categorical"):
            raise ValueError(f"variable {item!r}: kind must be 'continuous' or 'categorical'")
        out.append((name.strip(), kind))
    if not out:
        raise ValueError("no variables given")
    return out


def _make_column(scope: str, space: str, name: str, kind: str, rdm: np.ndarray, n_rdm: int,
                 local: np.ndarray, values: np.ndarray, members: np.ndarray) -> Column:
    """A test of one data RDM (over ``n_rdm`` subjects) against a model on the subjects ``local``."""
    data = subset_rdm(rdm, n_rdm, local)
    engine = make_engine(data, values, kind)
    observed = int(engine.statistics(np.arange(local.size)[None])[0])
    # independent O(m log m) check of the engine on the observed labelling
    check = kendall(data, model_vector(values, kind)).s
    if check != observed:
        raise RuntimeError(f"{scope}/{space}/{name}: engine S={observed} disagrees with Kendall S={check}")
    den = math.sqrt(float(engine.n_pairs - engine.x_ties) * float(engine.n_pairs - engine.y_ties))
    return Column(scope, space, name, kind, int(local.size), int(engine.n_pairs), den, observed,
                  engine, np.asarray(members), [])


def _model_subjects(phenotypes: dict[str, np.ndarray], name: str, kind: str, n: int,
                    subset: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Subjects (indices) with the variable present (and in ``subset``) and their model values."""
    if name not in phenotypes:
        raise ValueError(f"phenotype column {name!r} not found; available: {sorted(phenotypes)}")
    raw = np.asarray(phenotypes[name])
    if raw.shape != (n,):
        raise ValueError(f"phenotype column {name!r} has shape {raw.shape}, expected ({n},)")
    ok = ~missing_mask(raw)
    if subset is not None:
        ok &= np.asarray(subset, bool)
    idx = np.flatnonzero(ok)
    return idx, model_values(raw[idx], kind, name)


def subset_for(subsets: dict | None, space: str, name: str) -> np.ndarray | None:
    """Subjects of variable ``name`` in feature space ``space``: the intersection of ``subsets[name]`` (a
    variable analysed in a subgroup, e.g. PANSS in patients) and ``subsets[(space, name)]`` (a space analysed in
    a subgroup, e.g. S in patients); None when neither is given."""
    parts = [np.asarray(v, bool) for v in ((subsets or {}).get(name), (subsets or {}).get((space, name)))
             if v is not None]
    if not parts:
        return None
    out = parts[0].copy()
    for part in parts[1:]:
        out &= part
    return out


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes() if a.dtype.kind != "O" else repr(a.tolist()).encode())
    return h.hexdigest()


def _check_same_inputs(comm: Any | None, digest: str) -> None:
    """Every rank must hold identical inputs; otherwise the null distributions would differ."""
    if comm is None:
        return
    digests = comm.allgather(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"MPI ranks hold different RSA inputs (input digests {digests})")


def run_family(columns: list[Column], n: int, segments: list[tuple[int, int]], permutations: int,
               seed: int, family_key: tuple[int, ...], block_size: int, fwe: str, alternative: str,
               comm: Any | None, progress: bool = True, timing: dict | None = None
               ) -> tuple[list[dict], np.ndarray | None]:
    """Permutation test of every column with one shared relabelling per permutation.

    Returns the result rows and the ``(B, T)`` null matrix of ``S`` (rank 0; ``([], None)`` elsewhere).
    """
    fwe_mod._check(alternative, fwe)
    sizes = block_sizes(permutations, block_size)
    observed = np.array([c.observed for c in columns], np.int64)
    direct = [k for k, c in enumerate(columns) if c.engine is not None]

    def compute(b: int, size: int) -> np.ndarray:
        perms = perm_block(block_rng(seed, family_key, b), size, n, segments)
        out = np.zeros((size, len(columns)), np.int64)
        cache: dict[bytes, np.ndarray] = {}
        for k in direct:
            c = columns[k]
            key = c.members.tobytes()
            if key not in cache:
                cache[key] = restrict(perms, c.members, n)
            out[:, k] = c.engine.statistics(cache[key])
        for k, c in enumerate(columns):
            if c.parts:
                out[:, k] = out[:, c.parts].sum(axis=1)
        return out

    null, counts = run_blocks(compute, sizes, comm,
                              lambda rows: fwe_mod.exceed(rows, observed, alternative), len(columns),
                              progress=progress, timing=timing)
    if null is None:
        return [], None
    check = fwe_mod.exceed(null, observed, alternative)
    if not np.array_equal(check, counts):
        raise RuntimeError("reduced exceedance counts disagree with the gathered null matrix")
    p = fwe_mod.p_values(counts, permutations)
    p_fwe = np.empty(len(columns))
    for scope in dict.fromkeys(c.scope for c in columns):
        ks = [k for k, c in enumerate(columns) if c.scope == scope]
        p_fwe[ks] = fwe_mod.fwe_correct(null[:, ks], observed[ks], fwe, alternative)
    rows = []
    for k, c in enumerate(columns):
        tau_null = null[:, k] / c.n_pairs if c.n_pairs else np.full(len(null), np.nan)
        q = np.quantile(tau_null, [0.025, 0.5, 0.975])
        tau_a = c.observed / c.n_pairs if c.n_pairs else math.nan
        tau_b = c.observed / c.tau_b_den if c.tau_b_den > 0 else math.nan
        rows.append({
            "scope": c.scope, "space": c.space, "variable": c.variable, "kind": c.kind, "n": c.n,
            "tau_a": float(tau_a), "tau_b": float(tau_b), "p": float(p[k]), "p_fwe": float(p_fwe[k]),
            "null_q025": float(q[0]), "null_q50": float(q[1]), "null_q975": float(q[2]),
            "marked": bool(abs(tau_a) > MARK_TAU and p[k] < MARK_P),
            "S": int(c.observed), "pairs": int(c.n_pairs), "alternative": alternative,
        })
    return rows, null


def run_rsa(spaces: dict[str, np.ndarray], phenotypes: dict[str, np.ndarray],
            variables: list[tuple[str, str]], permutations: int = 1000, seed: int = 0,
            distance: str = "euclidean", strata: np.ndarray | None = None, fwe: str = "maxT",
            alternative: str = "two-sided", comm: Any | None = None, block_size: int = 500,
            subsets: dict[str, np.ndarray] | None = None, scope: str = "",
            return_null: bool = False, progress: bool = False, timing: dict | None = None
            ) -> list[dict] | tuple[list[dict], np.ndarray]:
    """RSA of feature spaces against phenotype model RDMs with a subject-label permutation test.

    Parameters
    ----------
    spaces : dict of str to ndarray
        Feature space name -> ``(n, d)`` posterior means or ``(K, n, d)`` posterior samples (the feature
        RDM is then averaged over the samples). Row-aligned with ``phenotypes``.
    phenotypes : dict of str to ndarray
        Column -> ``(n,)`` values (float with NaN for missing, or str with ``""``/``n/a`` missing).
    variables : list of (str, str)
        ``(column, kind)`` with kind ``"continuous"`` (model ``|x_i - x_j|``) or ``"categorical"``
        (model ``[g_i != g_j]``). Subjects missing a variable are dropped for that model only.
    permutations : int
        Number of permutations ``B``.
    seed : int
        Master seed; block ``b`` uses ``SeedSequence(seed, spawn_key=(0, b))``.
    distance : {"euclidean", "correlation"}
        Feature RDM distance.
    strata : ndarray (n,), optional
        Permute subject labels only within these groups (e.g. site in a pooled analysis).
    fwe : {"maxT", "minP"}
        Family-wise correction over all variables x spaces.
    alternative : {"two-sided", "greater", "less"}
    comm : mpi4py communicator, optional
        Blocks are spread over its ranks; results are identical for any number of ranks.
    block_size : int
        Permutations per seeded block.
    subsets : dict, optional
        Variable -> subjects it is analysed in (e.g. patients only for PANSS), and ``(space, variable)`` ->
        subjects for a space analysed in a subgroup (e.g. S in patients); see :func:`subset_for`.
    scope : str
        Value of the ``scope`` key of every row.
    return_null : bool
        Also return the ``(B, T)`` integer null matrix of ``S`` (columns in row order).
    progress : bool
        Show a tqdm bar over the blocks.
    timing : dict, optional
        Filled on rank 0 with the blocks and CPU seconds of every rank.

    Returns
    -------
    list of dict
        One row per (space, variable): ``scope, space, variable, kind, n, tau_a, tau_b, p, p_fwe,
        null_q025, null_q50, null_q975, marked, S, pairs, alternative``. Every rank gets the rows.
    """
    if not spaces:
        raise ValueError("no feature spaces given")
    sizes = {name: (np.shape(x)[0] if np.ndim(x) == 2 else np.shape(x)[1]) for name, x in spaces.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"feature spaces differ in subject count: {sizes}")
    n = next(iter(sizes.values()))
    order = np.arange(n)
    segments = [(0, n)]
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != (n,):
            raise ValueError(f"strata has shape {strata.shape}, expected ({n},)")
        if missing_mask(strata).any():
            raise ValueError("strata contain missing values")
        order = np.argsort(strata.astype(str), kind="stable")
        segments = strata_segments(strata.astype(str)[order], n)
    rdms = {name: feature_rdm(np.asarray(x)[..., order, :], distance) for name, x in spaces.items()}
    phen = {k: np.asarray(v)[order] for k, v in phenotypes.items()}
    subs = {k: np.asarray(v, bool)[order] for k, v in (subsets or {}).items()}
    columns = []
    for name, kind in variables:
        for space, rdm in rdms.items():
            members, values = _model_subjects(phen, name, kind, n, subset_for(subs, space, name))
            if members.size < MIN_SUBJECTS:
                raise ValueError(f"variable {name!r} in space {space}: only {members.size} subjects with a value "
                                 f"(need {MIN_SUBJECTS})")
            columns.append(_make_column(scope, space, name, kind, rdm, n, members, values, members))
    _check_same_inputs(comm, _digest(*rdms.values(), *[c.members for c in columns],
                                     np.array([c.observed for c in columns])))
    rows, null = run_family(columns, n, segments, permutations, seed, (0,), block_size, fwe,
                            alternative, comm, progress, timing)
    if comm is not None:
        rows = comm.bcast(rows, root=0)
    return (rows, null) if return_null else rows


def run_loso(folds: dict[str, dict[str, Any]], variables: list[tuple[str, str]], permutations: int,
             seed: int, distance: str = "euclidean", fwe: str = "maxT", alternative: str = "two-sided",
             comm: Any | None = None, block_size: int = 500,
             subsets: dict[str, dict[str, np.ndarray]] | None = None, within_site: bool = True,
             progress: bool = True, timing: dict | None = None
             ) -> tuple[list[dict], np.ndarray | None, list[str]]:
    """RSA per held-out site and pooled over held-out sites.

    Parameters
    ----------
    folds : dict
        Held-out site -> ``{"spaces": {name: (n, d) or (K, n, d)}, "phenotypes": {col: (n,)}}`` of the
        site's held-out subjects.
    subsets : dict, optional
        Held-out site -> (variable or ``(space, variable)``) -> bool mask over that site's subjects
        (:func:`subset_for`).
    within_site : bool
        Draw permutations within site. Every statistic only uses within-site cells, so the restriction
        of a permutation to one site is uniform either way; the option only changes which draws are made.

    Returns
    -------
    rows, null, columns
        Rows for every site scope and the ``pooled`` scope; the null matrix of ``S`` and its column
        labels ``scope/space/variable`` on rank 0.
    """
    sites = list(folds)
    offsets = np.cumsum([0] + [_n_subjects(folds[s]["spaces"]) for s in sites])
    n = int(offsets[-1])
    segments = ([(int(offsets[i]), int(offsets[i + 1])) for i in range(len(sites))] if within_site
                else [(0, n)])
    columns: list[Column] = []
    pooled: dict[tuple[str, str, str], list[int]] = {}
    digests = []
    for si, site in enumerate(sites):
        fold = folds[site]
        ns = int(offsets[si + 1] - offsets[si])
        for space, x in fold["spaces"].items():
            rdm = feature_rdm(np.asarray(x), distance)
            digests.append(_digest(rdm))
            for name, kind in variables:
                sub = subset_for((subsets or {}).get(site), space, name)
                local, values = _model_subjects(fold["phenotypes"], name, kind, ns, sub)
                if local.size < MIN_SUBJECTS or np.unique(values).size < 2:
                    log.warning("site %s, %s: %d subjects with %d distinct values; not tested at this site",
                                site, name, local.size, np.unique(values).size)
                    continue
                col = _make_column(site, space, name, kind, rdm, ns, local, values, local + offsets[si])
                pooled.setdefault((space, name, kind), []).append(len(columns))
                columns.append(col)
    for (space, name, kind), parts in pooled.items():
        cs = [columns[k] for k in parts]
        columns.append(Column("pooled", space, name, kind, sum(c.n for c in cs), sum(c.n_pairs for c in cs),
                              sum(c.tau_b_den for c in cs), sum(c.observed for c in cs), parts=parts))
    if not columns:
        raise ValueError("no (site, variable) has enough subjects with distinct values to test")
    _check_same_inputs(comm, _digest(np.array(digests), np.array([c.observed for c in columns])))
    rows, null = run_family(columns, n, segments, permutations, seed, (1,), block_size, fwe, alternative,
                            comm, progress, timing)
    labels = [f"{c.scope}/{c.space}/{c.variable}" for c in columns]
    return rows, null, labels


def _n_subjects(spaces: dict[str, np.ndarray]) -> int:
    ns = {k: (np.shape(v)[0] if np.ndim(v) == 2 else np.shape(v)[1]) for k, v in spaces.items()}
    if len(set(ns.values())) != 1:
        raise ValueError(f"feature spaces differ in subject count: {ns}")
    return next(iter(ns.values()))
