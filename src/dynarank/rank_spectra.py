"""Starting ranks from a measured statistic: per-group spectra, a greedy allocation under a parameter budget, and
the adapter's A side pointed at the measured directions (``rank_init.py`` measures the statistic).

For one adapted ``Linear`` (d_out x d_in) the statistic is a matrix

    M = sum over tokens of  s x^T            # (d_out, d_in); x: the layer's input, s: what its output should do

(``rank_init.py``: s = -dL/dy, the loss gradient at the output, or s = y, the output itself). A rank of the update
``B A`` that reads input direction v (a row of A) can move the loss by about ||M v|| per unit step once B has learnt
it: under Adam every direction moves at about the learning rate, whatever its gradient, so a candidate's *gain* is
a singular value of M (not its square). Per rank group g:

* own layout (each group its own slots): the SVD of the group's slice M_g, M[rows_g, :] for split='rows' (q/k/v,
  MLPs) or M[:, cols_g] for split='cols' (the output projection): candidate k has gain sigma_k(M_g) and A-side
  direction v_k(M_g) (d_in for rows, d_g for cols).
* shared layout (the heads of a projection share the slots): the SVD of the whole M = U S V^T; slot j reads
  v_j; group g's gain on slot j is sigma_j times the share of the singular vector on the group's side,
  ``sigma_j * ||U[rows_g, j]||`` (rows) or ``sigma_j * ||V[cols_g, j]||`` (cols), so sum_g gain^2 = sigma_j^2.

The allocation is a greedy water-filling: candidates sorted by gain per parameter (``SlotCosts.rank_price``), each
taken while the adapter's exact size (a shared slot's A row is paid by its first user) stays within the budget.
Every group first gets its ``floor`` best candidates; a candidate with zero gain (below ``RELATIVE_ZERO`` of the
largest) is never taken. The kept directions are written into A (``write_directions``), and rescaled to read from the
measured inputs what a default-drawn row reads (``input_energy``, ``match_input_scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layer import ElasticLoRALinear

RELATIVE_ZERO = 1e-6  # a gain below this fraction of the largest one is float rounding of zero (M is float32)


@dataclass
class LayerSpectrum:
    """The candidates of one layer: ``gains[g, k]`` and the A-side direction of each.

    Attributes:
        gains: (G, K) float64, K = the layer's live rank per group (all equal on a fresh adapter).
        vectors: (G, K, n) in the own layout (n = d_in for rows, d_g for cols); (K, d_in) in the shared layout.
    """

    gains: torch.Tensor
    vectors: torch.Tensor


def _canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each vector (last dim) so that its largest-magnitude entry is positive: an SVD's signs are arbitrary,
    and two workers whose statistics differ by rounding must write the same factors."""
    index = vectors.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vectors, -1, index))
    return vectors * torch.where(sign == 0, torch.ones_like(sign), sign)


def top_svd(m: torch.Tensor, k: int, oversample: int = 8, power: int = 2):
    """The k leading singular triplets (U (..., d1, k), S (..., k), Vh (..., k, d2)) of m (..., d1, d2).

    Exact for small matrices; otherwise a randomized range finder (Halko et al. 2011: k + oversample Gaussian
    probes drawn from a fixed seed, ``power`` subspace iterations), which costs O(d1 d2 k) instead of a full SVD's
    O(d1 d2 min(d1, d2)): a 576 x 576 module's full SVD alone takes about a training step's time on a CPU core."""
    d1, d2 = m.shape[-2:]
    width = k + oversample
    if min(d1, d2) <= 4 * width:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    probes = torch.randn(*m.shape[:-2], d2, width, generator=torch.Generator().manual_seed(0), dtype=m.dtype)
    y = m @ probes.to(m.device)  # (..., d1, width): a sample of m's range
    mt = m.transpose(-1, -2)
    for _ in range(power):
        y = m @ (mt @ torch.linalg.qr(y).Q)  # subspace iteration: sharpens the leading directions
    q = torch.linalg.qr(y).Q  # (..., d1, width) orthonormal
    ub, s, vh = torch.linalg.svd(q.transpose(-1, -2) @ m, full_matrices=False)  # (..., width, d2): small
    return (q @ ub)[..., :k], s[..., :k], vh[..., :k, :]


def layer_spectrum(layer: ElasticLoRALinear, stat: torch.Tensor, normalise: bool) -> LayerSpectrum:
    """The candidates of ``layer`` from its statistic ``stat`` (d_out, d_in); ``normalise`` divides the gains by
    ||M||_F (statistics whose scale differs between modules, such as activations)."""
    m = stat.double()
    k, n_groups, d_g = layer.max_rank, layer.n_groups, layer.group_size
    if layer.layout == "own" or n_groups == 1:
        if layer.split == "rows":
            slices = m.view(n_groups, d_g, -1)  # (G, d_g, d_in)
        else:
            slices = m.view(m.shape[0], n_groups, d_g).permute(1, 0, 2)  # (G, d_out, d_g)
        _, s, vh = top_svd(slices, k)  # s (G, K), vh (G, K, n)
        gains, vectors = s, _canonical_signs(vh)
    else:
        u, s, vh = top_svd(m, k)  # u (d_out, K), s (K,), vh (K, d_in)
        if layer.split == "rows":
            share = u.reshape(n_groups, d_g, k).norm(dim=1)  # (G, K): ||U[rows_g, j]||
        else:
            share = vh.reshape(k, n_groups, d_g).norm(dim=2).t()  # (G, K): ||V[cols_g, j]||
        gains, vectors = s * share, _canonical_signs(vh)
    if normalise:
        total = float(m.norm())
        gains = gains / total if total > 0 else torch.zeros_like(gains)
    return LayerSpectrum(gains.contiguous(), vectors.contiguous())


def allocate(
    layers: dict[str, ElasticLoRALinear], spectra: dict[str, LayerSpectrum], budget: int, floor: int
) -> tuple[dict[str, list[list[int]]], int]:
    """The candidates each group keeps, and the adapter's size with them.

    Args:
        layers: the adapted modules (their order breaks ties between equal gains per parameter).
        spectra: each module's candidates.
        budget: adapter parameters the kept candidates may cost at most (the floor is kept even beyond it).
        floor: candidates every group keeps first (its best ones).
    """
    names = list(layers)
    chosen = {name: [set() for _ in range(layers[name].n_groups)] for name in names}
    used: dict[str, set[int]] = {name: set() for name in names}  # slots some group of the layer keeps (shared)
    size = 0

    def cost(name: str, k: int) -> int:
        return layers[name].costs.added_rank(k in used[name])

    def take(name: str, g: int, k: int) -> None:
        nonlocal size
        size += cost(name, k)
        chosen[name][g].add(k)
        used[name].add(k)

    # Gains within float rounding of zero (a group the data never reaches) count as zero.
    tiny = RELATIVE_ZERO * max((float(spectra[n].gains.max()) for n in names if spectra[n].gains.numel()), default=0)
    candidates = []
    for i, name in enumerate(names):
        gains = spectra[name].gains.tolist()
        price = layers[name].costs.rank_price()
        for g, row in enumerate(gains):
            best = sorted(range(len(row)), key=lambda k: (-row[k], k))
            for k in best[:floor]:
                take(name, g, k)
            candidates += [(-row[k] / price, i, g, k) for k in best[floor:] if row[k] > tiny]
    for _, i, g, k in sorted(candidates):
        name = names[i]
        if size + cost(name, k) <= budget:
            take(name, g, k)
    return {name: [sorted(s) for s in groups] for name, groups in chosen.items()}, size


@torch.no_grad()
def write_directions(layer: ElasticLoRALinear, spectrum: LayerSpectrum) -> None:
    """Point every A-side rank of a fresh layer at its candidate's direction, at the norm of the default draw.

    PEFT's default A (U(+-1/sqrt(d_in)) per entry) gives a direction of n entries the norm sqrt(n / (3 d_in)); the
    directions are written at that norm, so the learning rate means what it means for a random A. The B side stays
    zero: the layer computes what its base computes.
    """
    b_side = layer.group_weight if layer.split == "rows" else layer.shared_weight
    if bool(b_side.any()):
        raise ValueError("data-driven ranks start from a fresh adapter (B = 0): initialise before training.")
    d_in, d_g = layer.in_features, layer.group_size
    slots, vectors = layer.slots, spectrum.vectors
    shared = layer.layout == "shared" and layer.n_groups > 1
    offset = 0
    for g, group in enumerate(slots):
        for k, slot in enumerate(group):
            vec = vectors[slot] if shared else vectors[g, k]  # unit norm; a fresh shared layer's slot j is rank j
            if layer.split == "rows":
                layer.shared_weight[slot] = (vec * math.sqrt(1 / 3)).to(layer.shared_weight.dtype)
            else:
                part = vec[g * d_g : (g + 1) * d_g] * math.sqrt(1 / 3) if shared else vec * math.sqrt(d_g / (3 * d_in))
                layer.group_weight[:, offset + k] = part.to(layer.group_weight.dtype)
        offset += len(group)


@torch.no_grad()
def input_energy(layer: ElasticLoRALinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What each A-side vector w of a fresh layer reads from inputs ``x`` (N, d_in): per vector, in the layer's
    order (rows split: its slots; cols split: group g's rank k at column g * r + k), the sums over the rows of
    (w . x_w)^2 and of ||x_w||^2, x_w the part of x the vector reads (all of it, or group g's columns). float64 (V,)
    each, on the CPU: sums, so that workers' shares add up."""
    x = x.to(layer.shared_weight.device, torch.float64)
    if layer.split == "rows":
        proj = (x @ layer.shared_weight.double().t()).pow(2).sum(0)  # (S,)
        return proj.cpu(), x.pow(2).sum().expand_as(proj).cpu()
    d_g, r = layer.group_size, layer.max_rank
    xg = x.view(-1, layer.n_groups, d_g)  # (N, G, d_g)
    w = layer.group_weight.double().view(d_g, layer.n_groups, r)  # fresh: group g's ranks at columns g*r .. g*r+r-1
    proj = torch.einsum("ngd,dgr->ngr", xg, w).pow(2).sum(0)  # (G, r)
    norm = xg.pow(2).sum(dim=(0, 2))[:, None].expand_as(proj)  # (G, r): ||x_g||^2 summed
    return proj.reshape(-1).cpu(), norm.reshape(-1).cpu()


@torch.no_grad()
def match_input_scale(layer: ElasticLoRALinear, proj: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Rescale each A-side vector of a fresh layer so that what it reads, rms(w . x_w) over the measured inputs, is
    what a vector of PEFT's default draw reads on average: entries of variance 1 / (3 d_in) give
    E (w . x_w)^2 = ||x_w||^2 / (3 d_in). A measured direction often lines up with the few input channels that carry
    most of the activation (on SmolLM2 the top one reads up to ~20x what a random one does), and B's steps, about
    the learning rate each under Adam, then move the output that much further than for a random A. ``proj``, ``norm``:
    :func:`input_energy`'s sums (reduced across workers). A vector that reads nothing keeps its norm. Returns the
    factors (float64, in ``input_energy``'s order)."""
    target = norm / (3 * layer.in_features)
    factor = torch.where(proj > 0, (target / proj.clamp_min(1e-300)).sqrt(), torch.ones_like(proj))
    if layer.split == "rows":
        layer.shared_weight.mul_(factor.to(layer.shared_weight)[:, None])
    else:
        layer.group_weight.mul_(factor.to(layer.group_weight)[None, :])
    return factor


def cut_to(layer: ElasticLoRALinear, keep: list[list[int]], optimizer=None) -> None:
    """Remove every rank position of the layer that ``keep`` does not list (kept ranks keep their order)."""
    drop = {g: [k for k in range(r) if k not in set(kept)] for g, (r, kept) in enumerate(zip(layer.ranks, keep))}
    drop = {g: ks for g, ks in drop.items() if ks}
    if drop:
        layer.remove_slots(drop, optimizer=optimizer)
