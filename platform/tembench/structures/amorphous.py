"""Amorphous oxides: a random tetrahedral network for SiO2, soft-sphere glass for Al2O3.

Random tetrahedral network (RTN) for a-SiO2 (and WO2-like "tungsten oxide" after substitution):

1. Former (Si) sites by batched random sequential addition inside the region at the number
   density of the target mass density (2.2 g/cm³ → 0.02205 Si/Å³), hard core 2.6 Å.
2. Si–Si "bonds" chosen greedily by increasing length (cut-off 4.0 Å, then 5.0 Å for Si
   left under-coordinated), at most 4 per Si and never at < 80° to an existing bond of
   either Si (no 3-rings of nearly collinear bonds), so the Si graph is a 4-coordinated
   random network away from surfaces.
3. One bridging O per Si–Si bond (near the midpoint, slightly off-axis); Si with fewer than
   4 bonds (surfaces) get non-bridging O so every Si is SiO4.
4. Relaxation by momentum gradient descent of a valence-force energy: Si–O springs to 1.61 Å,
   O–O springs within each SiO4 to 1.61·√(8/3) = 2.63 Å (tetrahedral O–Si–O angle), weak
   Si–Si springs across bridging O to 3.06 Å (Si–O–Si ≈ 144°), and a short-range repulsion
   for every other pair closer than the minimum distances (Si–Si 2.8, O–O 2.45, Si–O 2.4 Å)
   and from fixed obstacle atoms (e.g. the crystalline core).

This is a documented stand-in for the DFT a-SiO2 model Ren 2020 used (their ref. 49); the
tests check its Si–O bond lengths, O–Si–O angles, coordination and density.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from tembench._lazy import lazy_import
from tembench.errors import TembenchError

_spatial = lazy_import("scipy.spatial")  # k-d trees; loaded on first use (fast start-up)

AVOGADRO = 6.02214076e23
SI_MASS_G, O_MASS_G = 28.0855, 15.9994
SIO2_MOLAR_MASS_G = SI_MASS_G + 2 * O_MASS_G
EXPECTED_O_PER_SI = 2.15
SI_O_BOND_A = 1.61
TETRA_O_O_A = SI_O_BOND_A * np.sqrt(8.0 / 3.0)
SI_SI_BRIDGE_A = 3.06


@dataclass
class Region:
    """Where to put atoms: a bounding box, a membership test and (optionally) periodicity.

    ``contains(positions) -> bool mask``; ``periodic`` means the box [lo, hi) is periodic on
    all three axes (then ``contains`` is ignored).
    """

    lo: np.ndarray
    hi: np.ndarray
    contains: Callable[[np.ndarray], np.ndarray] | None = None
    periodic: bool = False

    def __post_init__(self):
        self.lo = np.asarray(self.lo, dtype=np.float64)
        self.hi = np.asarray(self.hi, dtype=np.float64)

    @property
    def box(self) -> np.ndarray:
        return self.hi - self.lo

    def mask(self, p: np.ndarray) -> np.ndarray:
        inside = np.all((p >= self.lo) & (p < self.hi), axis=1)
        if self.contains is not None and not self.periodic:
            inside &= self.contains(p)
        return inside


def number_density_per_A3(density_g_cm3: float, molar_mass_g: float) -> float:
    """Formula units per Å³ for a mass density in g/cm³."""
    return density_g_cm3 / molar_mass_g * AVOGADRO * 1e-24


def _minimum_image(d: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    if box is None:
        return d
    return d - box * np.round(d / box)


def hard_core_points(region: Region, n_target: int, d_min_A: float, rng: np.random.Generator,
                     obstacles: np.ndarray | None = None, d_obstacle_A: float = 0.0,
                     max_rounds: int = 200) -> np.ndarray:
    """Up to ``n_target`` random points in ``region`` at mutual distance ≥ d_min (batched RSA)."""
    box = region.box if region.periodic else None
    obst_tree = _spatial.cKDTree(obstacles) if obstacles is not None and len(obstacles) and d_obstacle_A > 0 else None
    accepted = np.zeros((0, 3))
    for _ in range(max_rounds):
        need = n_target - len(accepted)
        if need <= 0:
            break
        cand = region.lo + rng.random((max(4 * need, 64), 3)) * region.box
        cand = cand[region.mask(cand)]
        if obst_tree is not None and len(cand):
            cand = cand[np.isinf(obst_tree.query(cand, distance_upper_bound=d_obstacle_A)[0])]
        if len(accepted) and len(cand):
            tree = _spatial.cKDTree(accepted - region.lo, boxsize=box) if box is not None else _spatial.cKDTree(accepted)
            q = cand - region.lo if box is not None else cand
            if box is not None:
                q = np.mod(q, box)
            cand = cand[np.isinf(tree.query(q, distance_upper_bound=d_min_A)[0])]
        if len(cand) > 1:  # resolve conflicts inside the batch: keep the earlier point of each close pair
            q = np.mod(cand - region.lo, box) if box is not None else cand
            pairs = _spatial.cKDTree(q, boxsize=box).query_pairs(d_min_A, output_type="ndarray")
            drop = np.zeros(len(cand), bool)
            for i, j in pairs[np.argsort(pairs[:, 0], kind="stable")]:
                if not drop[i]:
                    drop[j] = True
            cand = cand[~drop]
        accepted = np.concatenate([accepted, cand[:need]])
    return accepted


def _greedy_network(pos: np.ndarray, box: np.ndarray | None, cutoffs=(4.0, 5.0, 6.0), max_degree: int = 4,
                    min_angle_deg: float = 60.0, bonds_init: np.ndarray | None = None) -> np.ndarray:
    """Degree-limited Si–Si bonds added shortest first, rejecting bonds at < min_angle to an existing one."""
    n = len(pos)
    degree = np.zeros(n, np.int64)
    nbr_vecs: list[list[np.ndarray]] = [[] for _ in range(n)]
    nbrs: list[set[int]] = [set() for _ in range(n)]
    bonds: list[tuple[int, int]] = []

    def add(i, j, u):
        bonds.append((i, j))
        nbr_vecs[i].append(u)
        nbr_vecs[j].append(-u)
        nbrs[i].add(j)
        nbrs[j].add(i)
        degree[i] += 1
        degree[j] += 1

    if bonds_init is not None and len(bonds_init):
        d0 = _minimum_image(pos[bonds_init[:, 1]] - pos[bonds_init[:, 0]], box)
        for (i, j), v in zip(bonds_init.tolist(), d0):
            add(i, j, v / max(np.linalg.norm(v), 1e-12))
    cos_max = np.cos(np.radians(min_angle_deg))
    q = np.mod(pos, box) if box is not None else pos
    tree = _spatial.cKDTree(q, boxsize=box)
    for rc in cutoffs:
        pairs = tree.query_pairs(rc, output_type="ndarray")
        if not len(pairs):
            continue
        ok = (degree[pairs[:, 0]] < max_degree) & (degree[pairs[:, 1]] < max_degree)
        pairs = pairs[ok]
        d = _minimum_image(pos[pairs[:, 1]] - pos[pairs[:, 0]], box)
        r = np.linalg.norm(d, axis=1)
        order = np.argsort(r, kind="stable")
        for (i, j), v, length in zip(pairs[order].tolist(), d[order], r[order]):
            if degree[i] >= max_degree or degree[j] >= max_degree or j in nbrs[i]:
                continue
            u = v / length
            if any(u @ w > cos_max for w in nbr_vecs[i]) or any(-u @ w > cos_max for w in nbr_vecs[j]):
                continue
            add(i, j, u)
    return np.asarray(bonds, dtype=np.int64).reshape(-1, 2)


def _angle_triplets(bonds: np.ndarray, n: int) -> np.ndarray:
    """(centre, a, b, bond_index_a, bond_index_b) for every pair of bonds sharing an atom."""
    ends = np.concatenate([bonds, bonds[:, ::-1]])
    bidx = np.concatenate([np.arange(len(bonds))] * 2)
    order = np.argsort(ends[:, 0], kind="stable")
    centre, other, bidx = ends[order, 0], ends[order, 1], bidx[order]
    starts = np.searchsorted(centre, np.arange(n))
    stops = np.searchsorted(centre, np.arange(n), side="right")
    out = []
    for a in range(4):
        for b in range(a + 1, 4):
            has = stops - starts > b
            ia, ib = starts[has] + a, starts[has] + b
            out.append(np.column_stack([centre[ia], other[ia], other[ib], bidx[ia], bidx[ib]]))
    return np.concatenate(out) if out else np.zeros((0, 5), np.int64)


def tetrahedral_network(pos: np.ndarray, box: np.ndarray | None, rounds: int = 2, prune_angle_deg: float = 70.0,
                        obstacles=None, obstacle_min_A: float = 2.6, region: Region | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grow a 4-coordinated Si network and relax it toward tetrahedral geometry.

    Each round: add bonds greedily, relax Si positions (Si–Si 3.06 Å, second neighbours at the
    tetrahedral 5.0 Å, repulsion < 2.9 Å), then drop the longer bond of every Si–Si–Si angle
    below ``prune_angle_deg`` so the next round can re-bond in open directions.
    Returns (relaxed positions, bonds).
    """
    bonds = _greedy_network(pos, box, min_angle_deg=60.0)
    second = SI_SI_BRIDGE_A * np.sqrt(8.0 / 3.0)
    for r in range(rounds):
        tri = _angle_triplets(bonds, len(pos))
        springs = [(bonds, SI_SI_BRIDGE_A, 1.0), (tri[:, 1:3], second, 0.3)]
        pos = relax(pos, np.full(len(pos), 14), springs, {(14, 14): 2.9}, box,
                    np.concatenate([bonds, tri[:, 1:3]]), obstacles, obstacle_min_A, n_iter=60, region=region)
        if r == rounds - 1:
            break
        tri = _angle_triplets(bonds, len(pos))
        if len(tri):
            u = _minimum_image(pos[tri[:, 1]] - pos[tri[:, 0]], box)
            v = _minimum_image(pos[tri[:, 2]] - pos[tri[:, 0]], box)
            cosang = np.einsum("ij,ij->i", u, v) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
            bad = cosang > np.cos(np.radians(prune_angle_deg))
            lu, lv = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
            drop = np.unique(np.where(lu[bad] >= lv[bad], tri[bad, 3], tri[bad, 4]))
            keep = np.ones(len(bonds), bool)
            keep[drop] = False
            bonds = _greedy_network(pos, box, cutoffs=(4.0, 5.0, 6.0), min_angle_deg=prune_angle_deg,
                                    bonds_init=bonds[keep])
    return pos, bonds


def _pair_incidence_T(pairs: np.ndarray, n: int):
    """Sparse (n, m) matrix S with S @ g = gradient (n, 3) of pair terms whose gradient w.r.t. x_b is g
    (and −g for x_a). Built once per neighbour-list update, applied every iteration."""
    from scipy.sparse import csr_matrix

    m = len(pairs)
    rows = np.concatenate([pairs[:, 1], pairs[:, 0]])
    cols = np.concatenate([np.arange(m), np.arange(m)])
    vals = np.concatenate([np.ones(m), -np.ones(m)])
    return csr_matrix((vals, (rows, cols)), shape=(n, m))


def _scatter_pair_forces(pairs: np.ndarray, g: np.ndarray, n: int) -> np.ndarray:
    """Gradient contribution (n, 3) of pair terms whose gradient w.r.t. x_b is ``g`` (and −g for x_a)."""
    return np.asarray(_pair_incidence_T(pairs, n) @ g)


def _in_sorted(keys: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """``np.isin(keys, sorted_unique)`` for an already sorted, unique reference (no re-sorting)."""
    if len(sorted_unique) == 0:
        return np.zeros(len(keys), bool)
    idx = np.minimum(np.searchsorted(sorted_unique, keys), len(sorted_unique) - 1)
    return sorted_unique[idx] == keys


def relax(x: np.ndarray, numbers: np.ndarray, springs: list[tuple[np.ndarray, float | np.ndarray, float]],
          min_dist: dict[tuple[int, int], float], box: np.ndarray | None, exclude_pairs: np.ndarray,
          obstacles: np.ndarray | None = None, obstacle_min_A: float = 2.0, n_iter: int = 200,
          step: float = 0.05, momentum: float = 0.8, max_move_A: float = 0.1, k_rep: float = 2.0,
          neighbour_every: int = 10, region: Region | None = None, clip_to_box: bool = False) -> np.ndarray:
    """Momentum gradient descent of E = Σ k (r − r0)² over springs plus k_rep (r − d_min)² for every
    other pair (and every obstacle contact) closer than its minimum distance; returns positions.

    ``clip_to_box`` keeps atoms inside the (non-periodic) region's bounding box: a hard wall.
    """
    x = x.copy()
    n = len(x)
    v = np.zeros_like(x)
    zmax = int(numbers.max()) + 1
    tab = np.zeros((zmax, zmax))
    for (a, b), dmin in min_dist.items():
        if a < zmax and b < zmax:
            tab[a, b] = tab[b, a] = dmin
    dmax = max(min_dist.values())
    ex = np.sort(np.asarray(exclude_pairs, np.int64).reshape(-1, 2), axis=1)
    bonded_keys = np.unique(ex[:, 0] * n + ex[:, 1])
    sp_pairs = np.concatenate([p for p, _, _ in springs]) if springs else np.zeros((0, 2), np.int64)
    sp_r0 = np.concatenate([np.broadcast_to(np.asarray(r0, float), (len(p),)) for p, r0, _ in springs]) if springs else np.zeros(0)
    sp_k = np.concatenate([np.full(len(p), float(k)) for p, _, k in springs]) if springs else np.zeros(0)
    obst_tree = _spatial.cKDTree(obstacles) if obstacles is not None and len(obstacles) else None
    origin = region.lo if region is not None else 0.0
    for it in range(n_iter):
        if it % neighbour_every == 0:
            q = np.mod(x - origin, box) if box is not None else x
            rp = np.sort(_spatial.cKDTree(q, boxsize=box).query_pairs(dmax + 0.5, output_type="ndarray"), axis=1)
            rp = rp[~_in_sorted(rp[:, 0] * n + rp[:, 1], bonded_keys)]
            rd0 = tab[numbers[rp[:, 0]], numbers[rp[:, 1]]]
            keep = rd0 > 0
            pairs = np.concatenate([sp_pairs, rp[keep]])
            r0 = np.concatenate([sp_r0, rd0[keep]])
            k = np.concatenate([sp_k, np.full(int(keep.sum()), k_rep)])
            is_rep = np.concatenate([np.zeros(len(sp_pairs), bool), np.ones(int(keep.sum()), bool)])
            scatter = _pair_incidence_T(pairs, n)
            if obst_tree is not None:
                hits = obst_tree.query_ball_point(x, obstacle_min_A + 0.5)
                lens = np.fromiter((len(h) for h in hits), np.int64, len(hits))
                obst_idx = np.repeat(np.arange(n), lens)
                obst_pos = obstacles[np.concatenate([np.asarray(h, np.int64) for h in hits])] if lens.sum() else np.zeros((0, 3))
            else:
                obst_idx, obst_pos = np.zeros(0, np.int64), np.zeros((0, 3))
        d = _minimum_image(x[pairs[:, 1]] - x[pairs[:, 0]], box)
        r = np.maximum(np.sqrt(np.einsum("ij,ij->i", d, d)), 1e-6)
        kk = np.where(is_rep & (r >= r0), 0.0, k)
        grad = np.asarray(scatter @ ((2 * kk * (r - r0) / r)[:, None] * d))
        if len(obst_idx):
            do = x[obst_idx] - obst_pos
            ro = np.maximum(np.sqrt(np.einsum("ij,ij->i", do, do)), 1e-6)
            over = ro < obstacle_min_A
            if over.any():
                go = (2 * k_rep * (ro[over] - obstacle_min_A) / ro[over])[:, None] * do[over]
                for c in range(3):
                    grad[:, c] += np.bincount(obst_idx[over], go[:, c], minlength=n)
        v = momentum * v - step * grad
        move = np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
        v = np.where(move > max_move_A, v * (max_move_A / np.maximum(move, 1e-12)), v)
        x += v
        if clip_to_box and region is not None and box is None:
            x = np.clip(x, region.lo, np.nextafter(region.hi, region.lo))
    return x


def amorphous_sio2(region: Region, rng: np.random.Generator, density_g_cm3: float = 2.2,
                   obstacles: np.ndarray | None = None, obstacle_min_A: float = 2.0,
                   n_iter: int = 150, k_oo: float = 0.6, k_sisi: float = 0.2, k_sio: float = 1.0,
                   k_rep: float = 2.0, network_rounds: int = 2, prune_angle_deg: float = 70.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Random tetrahedral a-SiO2 network filling ``region``; returns (positions, numbers, stats).

    ``obstacles`` are fixed atoms (Å) the network keeps ≥ ``obstacle_min_A`` away from (after
    relaxation; Si sites start ≥ 2.6 Å away).
    """
    if density_g_cm3 <= 0:
        raise TembenchError(f"amorphous SiO2 density_g_cm3 = {density_g_cm3} must be > 0")
    # Surfaces and network defects leave some non-bridging O (O/Si ≈ 2.15 in bulk with the
    # default settings), so the Si count is set from the mass density of SiO_2.15.
    n_si_density = number_density_per_A3(density_g_cm3, SI_MASS_G + EXPECTED_O_PER_SI * O_MASS_G)
    # Region volume by Monte Carlo on the bounding box (exact for periodic boxes).
    if region.periodic or region.contains is None:
        vol = float(np.prod(region.box))
    else:
        probe = region.lo + rng.random((200_000, 3)) * region.box
        vol = float(np.prod(region.box)) * region.mask(probe).mean()
    n_si = int(round(n_si_density * vol))
    if n_si == 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64), {"n_si": 0}
    box = region.box if region.periodic else None
    si = hard_core_points(region, n_si, 2.6, rng, obstacles, d_obstacle_A=obstacle_min_A + 1.0)
    si, bonds = tetrahedral_network(si, box, rounds=network_rounds, prune_angle_deg=prune_angle_deg,
                                    obstacles=obstacles, obstacle_min_A=obstacle_min_A + 0.6, region=region)
    n_si = len(si)
    degree = np.bincount(bonds.ravel(), minlength=n_si)
    # Bridging O near each bond midpoint, nudged off-axis so the Si–O–Si angle can bend.
    d = _minimum_image(si[bonds[:, 1]] - si[bonds[:, 0]], box)
    jitter = rng.normal(0.0, 0.25, (len(bonds), 3))
    jitter -= (np.einsum("ij,ij->i", jitter, d) / np.maximum(np.einsum("ij,ij->i", d, d), 1e-12))[:, None] * d
    o_bridge = si[bonds[:, 0]] + d / 2 + jitter
    # Non-bridging O for under-coordinated Si, pointing away from its existing bonds.
    owner_si, o_term = [], []
    nb_dirs = [[] for _ in range(n_si)]
    for (i, j), v in zip(bonds.tolist(), d):
        u = v / max(np.linalg.norm(v), 1e-12)
        nb_dirs[i].append(u)
        nb_dirs[j].append(-u)
    for i in np.flatnonzero(degree < 4):
        dirs = list(nb_dirs[i])
        for _ in range(4 - degree[i]):
            if dirs:
                u = -np.sum(dirs, axis=0) + rng.normal(0, 0.3, 3)
            else:
                u = rng.normal(size=3)
            u /= max(np.linalg.norm(u), 1e-12)
            dirs.append(u)
            owner_si.append(i)
            o_term.append(si[i] + SI_O_BOND_A * u)
    o_term = np.asarray(o_term).reshape(-1, 3)
    owner_si = np.asarray(owner_si, np.int64)
    n_ob, n_ot = len(o_bridge), len(o_term)
    x = np.concatenate([si, o_bridge, o_term])
    numbers = np.concatenate([np.full(n_si, 14), np.full(n_ob + n_ot, 8)]).astype(np.int64)
    # Bond lists in the combined index space.
    o_idx_b = n_si + np.arange(n_ob)
    o_idx_t = n_si + n_ob + np.arange(n_ot)
    si_o = np.concatenate([np.column_stack([bonds[:, 0], o_idx_b]), np.column_stack([bonds[:, 1], o_idx_b]),
                           np.column_stack([owner_si, o_idx_t])])
    # O–O pairs inside each SiO4 (tetrahedral angle springs).
    order = np.argsort(si_o[:, 0], kind="stable")
    s_sorted, o_sorted = si_o[order, 0], si_o[order, 1]
    starts = np.searchsorted(s_sorted, np.arange(n_si))
    ends = np.searchsorted(s_sorted, np.arange(n_si), side="right")
    oo = []
    for a in range(4):
        for b in range(a + 1, 4):
            has = ends - starts > b
            oo.append(np.column_stack([o_sorted[starts[has] + a], o_sorted[starts[has] + b]]))
    oo = np.concatenate(oo) if oo else np.zeros((0, 2), np.int64)
    springs = [(si_o, SI_O_BOND_A, k_sio), (oo, TETRA_O_O_A, k_oo), (bonds, SI_SI_BRIDGE_A, k_sisi)]
    min_dist = {(14, 14): 2.8, (8, 8): 2.45, (8, 14): 2.4}
    x = relax(x, numbers, springs, min_dist, box, np.concatenate([si_o, oo, bonds]), obstacles, obstacle_min_A, n_iter=n_iter, region=region, k_rep=k_rep)
    if region.periodic:
        x = region.lo + np.mod(x - region.lo, region.box)
    stats = {"n_si": n_si, "n_bonds": len(bonds), "n_nonbridging_O": n_ot,
             "si_network_degree_mean": float(degree.mean()) if n_si else 0.0}
    return x, numbers, stats


def amorphous_dense(region: Region, rng: np.random.Generator, composition: dict[int, int], molar_mass_g: float,
                    density_g_cm3: float, min_dist_A: dict[tuple[int, int], float], obstacles: np.ndarray | None = None,
                    obstacle_min_A: float = 2.0, n_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Random dense packing with minimum pair distances (no chemical order) at a target mass density.

    ``composition`` maps Z to atoms per formula unit (Al2O3: {13: 2, 8: 3}); species are shuffled
    over uniformly random sites which are then pushed apart by the soft repulsion of
    :func:`relax` until pairs respect ``min_dist_A`` (approximately: the tail of a few % may stay
    up to ~10 % closer).
    """
    vol = float(np.prod(region.box))
    if not region.periodic and region.contains is not None:
        probe = region.lo + rng.random((200_000, 3)) * region.box
        vol *= region.mask(probe).mean()
    n_fu = int(round(number_density_per_A3(density_g_cm3, molar_mass_g) * vol))
    species = np.concatenate([np.full(n * n_fu, z) for z, n in composition.items()]).astype(np.int64)
    rng.shuffle(species)
    pts = np.zeros((0, 3))
    while len(pts) < len(species):
        cand = region.lo + rng.random((2 * (len(species) - len(pts)) + 16, 3)) * region.box
        pts = np.concatenate([pts, cand[region.mask(cand)]])
    x = relax(pts[:len(species)], species, [], min_dist_A, region.box if region.periodic else None,
              np.zeros((0, 2), np.int64), obstacles, obstacle_min_A, n_iter=n_iter, step=0.1, region=region,
              clip_to_box=not region.periodic)
    if region.periodic:
        x = region.lo + np.mod(x - region.lo, region.box)
    return x, species
