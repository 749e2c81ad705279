"""Running per-channel statistics of one probe point's feature maps over calibration images.

Every piece of state is a float64 sum or a running maximum (plus image and pixel counts), so
batches can be fed one at a time in bounded memory; statistics gathered by several processes
combine by summing their ``tensors()`` (an all-reduce), except the ``max.*`` entries, which
combine by maximum (``merge`` does both). Maps themselves are never stored.

Fast path: SSIM, PSNR and cosine of every channel pair are functions of each map's moments and of
the pairwise covariance (``similarity_from_moments``), so one float32 batched product of the
centred maps per image chunk gives all of them, plus M-std and the Gram for compensation; only
these small per-image (C, C) results are summed in float64. Only the upper triangle of each product
and sum is computed (the matrices are symmetric, the null is mirrored by design): wide layers'
products in row blocks, 5/8 of the work. Windowed SSIM and rank stay per map.

Two kinds of probe: *spatial* (a map of H x W pixels per image; similarities are averaged over
images) and *pooled* (one value per channel and image, e.g. a Linear after global pooling: the
"map" of a channel is its vector of values over all calibration images, and similarities are
those of these vectors). With the ``null`` statistic, the same similarities are also gathered
between channel i of one image and channel j of the image before it in the stream: the chance level
of unrelated maps. The stream is cut into blocks of NULL_BLOCK images and pairs never cross a block
(7 pairs per 8 images), which makes the null the same however the images are batched or sharded over
ranks, as long as shards hold whole blocks (``distributed.shard(..., block=NULL_BLOCK)``, as the
calibration loader does)."""
from __future__ import annotations

import torch

from simprune.distributed import forward_precision
from simprune.errors import SimpruneError
from simprune.stats.similarity import (
    C1,
    C2,
    MOMENT_METRICS,
    SIMILARITIES,
    MapMoments,
    MomentParts,
    map_rank,
    similarity_from_moments,
    windowed_ssim_matrix,
)

METRICS = ("ssim", "ssim-windowed", "psnr", "cosine", "mstd", "rank", "gram", "null")
_COUNTS = ("images", "pixels", "null_images")
_MAXIMA = ("max.hi", "max.neg_lo")
CHUNK_ELEMENTS = 2**22  # float32 values per temporary (16 MiB): bounds memory whatever B, C, H, W
NULL_BLOCK = 8  # null pairs stay inside blocks of this many consecutive images (see the module docstring)
ROW_BLOCK_ELEMENTS = 2**18  # float32 values per block of similarity rows (1 MiB): the passes stay in cache
PRODUCT_BLOCKS = 4  # row blocks of the upper-triangular products: 5/8 of a full product's work
SPLIT_FROM = 128  # channels from which a layer's products are split; narrower ones are too small to gain


def _state_names(metrics, pooled: bool) -> list[str]:
    """Names of the sum tensors that the given metrics need, in a fixed order."""
    sims = [m for m in SIMILARITIES if m in metrics]
    if pooled:  # everything follows from the moments over images
        return ["gram", "channel_sum"] + (["cross"] if "null" in metrics else [])
    names = [f"sim.{m}" for m in sims]
    names += [f"null.{m}" for m in sims] if "null" in metrics else []
    names += [m for m in ("mstd", "rank") if m in metrics]
    names += ["rank_full"] if "rank" in metrics else []
    names += ["gram", "channel_sum"] if "gram" in metrics else []
    return names


class ChannelStats:
    """Sums over calibration images of pairwise similarities, M-std, map rank and the raw Gram."""

    def __init__(self, channels: int, metrics, *, window: int = 7, c1: float = C1, c2: float = C2,
                 psnr_cap: float = 100.0, pooled: bool = False, device: str | torch.device = "cpu"):
        """Track ``metrics`` (a subset of METRICS) for maps with ``channels`` channels."""
        metrics = frozenset(metrics)
        unknown = sorted(metrics - set(METRICS))
        if unknown:
            raise SimpruneError(f"unknown statistic(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        if channels < 1:
            raise SimpruneError(f"ChannelStats needs at least one channel, got {channels}")
        self.channels, self.metrics = int(channels), metrics
        self.options = {"window": window, "c1": c1, "c2": c2, "psnr_cap": psnr_cap, "pooled": bool(pooled)}
        self.device = torch.device(device)
        self._prev = self._prev_raw = None  # the last image seen, the partner of the next one
        self._position = 0  # images seen by this object (the stream position of the next one)
        self._mirrored: dict[str, torch.Tensor] = {}  # symmetric views of upper-triangular sums, until the next change
        C = self.channels
        self._state = {n: torch.zeros((), dtype=torch.float64, device=self.device) for n in _COUNTS}
        for name in _state_names(metrics, self.pooled):
            two_d = name.startswith(("sim.", "null.")) or name in ("gram", "cross")
            self._state[name] = torch.zeros((C, C) if two_d else (C,), dtype=torch.float64, device=self.device)
        for name in _MAXIMA:
            self._state[name] = torch.full((C,), -torch.inf, dtype=torch.float64, device=self.device)

    @property
    def pooled(self) -> bool:
        return self.options["pooled"]

    def _add(self, name: str, value: torch.Tensor) -> None:
        """Accumulate a float64 sum into the state tensor ``name``."""
        self._state[name] += value.to(device=self.device, dtype=torch.float64)

    def _raise_max(self, hi: torch.Tensor, lo: torch.Tensor) -> None:
        if not bool(torch.isfinite(hi - lo).all()):  # NaN propagates through amax/amin; inf - x or x - inf is inf
            raise SimpruneError("feature maps contain NaN or inf; check the model and calibration data")
        for name, v in (("max.hi", hi), ("max.neg_lo", -lo)):
            torch.maximum(self._state[name], v, out=self._state[name])

    @torch.no_grad()
    def update(self, maps: torch.Tensor) -> None:
        """Add one batch of maps (B, C, H, W) (pooled probes also take (B, C)); each image counts once."""
        ok = isinstance(maps, torch.Tensor) and maps.dim() in ((2, 4) if self.pooled else (4,)) \
            and maps.shape[1] == self.channels
        if ok and self.pooled and maps[0].numel() != self.channels:
            ok = False
        if not ok:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            want = "(B, C) or (B, C, 1, 1)" if self.pooled else "(B, C, H, W)"
            raise SimpruneError(f"expected feature maps {want} with C={self.channels}, got {shape}")
        if maps.shape[0] == 0:
            return
        self._mirrored.clear()
        with forward_precision(maps.device, "fp32"):  # a caller's bf16 autocast must not round the sums
            if self.pooled:
                self._update_pooled(maps.detach().reshape(maps.shape[0], self.channels))
            else:
                self._update_spatial(maps.detach())

    def _update_spatial(self, x: torch.Tensor) -> None:
        B, C, H, W = x.shape
        P = H * W
        flat = x.reshape(B, C, P)
        if any(m in self.metrics for m in MOMENT_METRICS + ("mstd", "gram")):
            nb = max(1, min(B, CHUNK_ELEMENTS // max(C * P, C * C)))
            means = [self._moments_chunk(flat[b0:b0 + nb], P, self._position + b0) for b0 in range(0, B, nb)]
            if "gram" in self.metrics:  # sum over pixels of x x^T = P (cov + mean mean^T), per image
                m64 = torch.cat(means).double()
                self._state["gram"].addmm_(m64.T, m64, alpha=P)
                self._add("channel_sum", P * m64.sum(0))
        else:
            lo, hi = flat.amin(-1), flat.amax(-1)
            self._raise_max(hi.amax(0), lo.amin(0))
        if "ssim-windowed" in self.metrics:
            self._windowed(x)
        if "rank" in self.metrics:
            self._add("rank", map_rank(x).sum(dim=0))
            self._add("rank_full", torch.full((C,), float(B * min(H, W))))
        self._count(B, B * P)

    def _count(self, images: int, pixels: int) -> None:
        self._state["images"] += images
        self._state["pixels"] += pixels
        if "null" in self.metrics:
            inner, with_prev = _paired(self._position, images)
            self._state["null_images"] += inner.numel() + with_prev
        self._position += images

    def _moments_chunk(self, xb: torch.Tensor, P: int, start: int) -> torch.Tensor:
        """All moment-based statistics of a chunk of images: float32 products of the centred maps (upper
        triangle only, :func:`_upper_products`; and with the previous image for the null), each row
        piece's float32 sum over the chunk added into the float64 state; returns the means."""
        xc = xb.to(torch.float32, copy=True)  # the one full-size temporary
        hi, lo = xc.amax(-1), xc.amin(-1)
        self._raise_max(hi.amax(0), lo.amin(0))
        mean = xc.mean(-1)
        xc -= mean.unsqueeze(-1)
        blocks = _row_blocks(self.channels)
        cov = _upper_products(xc, xc, blocks)
        var = torch.cat([c[:, :, :r1 - r0].diagonal(dim1=1, dim2=2) for r0, r1, c in cov], 1).clamp_min(0.0)
        mom = MapMoments(mean, var, lo, hi - lo).parts()  # scaled once: read by every pairing below
        for metric in (m for m in MOMENT_METRICS if m in self.metrics):
            self._accumulate(f"sim.{metric}", metric, mom, mom, cov, identical=True)
        if "null" in self.metrics:
            self._null_pairs(xc, mom, start, blocks)
        if "mstd" in self.metrics:
            self._add_at("mstd", slice(None), var.sqrt().sum(0))
        if "gram" in self.metrics:
            for r0, _, c in cov:
                self._add_at("gram", (slice(r0, r0 + c.shape[1]), slice(r0, None)), c.sum(0).mul_(P))
        return mean

    def _add_at(self, name: str, index, value: torch.Tensor) -> None:
        """Add a float32 partial sum into the float64 state ``name`` at ``index``."""
        self._state[name][index] += value

    def _accumulate(self, name: str, metric: str, a: MomentParts, b: MomentParts, products: list,
                    weights: torch.Tensor | None = None, identical: bool = False) -> None:
        """Add the sum over images (weighted by ``weights``) of ``similarity_from_moments`` into the upper
        triangle of state ``name``, from :func:`_upper_products` of ``a``'s and ``b``'s maps. A block of
        rows at a time, columns from the block's first row: the dozen passes over each block stay in
        cache however wide the layer. With ``identical`` (a map with itself) the diagonal is exact."""
        kw = self._kw()
        for R0, R1, prod in products:
            nb, width = prod.shape[0], prod.shape[-1]
            rows = max(1, min(R1 - R0, ROW_BLOCK_ELEMENTS // (nb * width)))
            for r0 in range(R0, R1, rows):
                r1 = min(R1, r0 + rows)
                sim = similarity_from_moments(metric, a.select((..., slice(r0, r1))), b.select((..., slice(r0, None))),
                                              prod[:, r0 - R0:r1 - R0, r0 - R0:], **kw)
                block = sim.sum(0) if weights is None else torch.tensordot(weights, sim, 1)
                if identical:
                    diag = torch.arange(r1 - r0)
                    block[diag, diag] = nb * (kw["cap"] if metric == "psnr" else 1.0)
                self._add_at(name, (slice(r0, r1), slice(r0, None)), block)

    def _null_pairs(self, xc: torch.Tensor, mom: MomentParts, start: int, blocks: list) -> None:
        """Similarities of channel i on each image with channel j on the image before it (centred maps
        xc of the images at stream positions ``start``, ``start + 1``, ...): one product of the chunk's
        consecutive images (views, no copies), the pairs that open a block of NULL_BLOCK weighted 0."""
        n, metrics = xc.shape[0], [m for m in MOMENT_METRICS if m in self.metrics]
        keep = [float((start + i) % NULL_BLOCK != 0) for i in range(1, n)]
        if any(keep):
            cross = _upper_products(xc[1:], xc[:-1], blocks)
            weights = None if all(keep) else torch.tensor(keep, device=xc.device)
            for metric in metrics:
                self._accumulate(f"null.{metric}", metric, mom.select(slice(1, None)), mom.select(slice(0, -1)),
                                 cross, weights)
        if n > 0 and start % NULL_BLOCK != 0:
            pxc, pmom = self._prev
            cross = _upper_products(xc[:1], pxc.unsqueeze(0), blocks)
            for metric in metrics:
                self._accumulate(f"null.{metric}", metric, mom.select(slice(0, 1)), pmom, cross)
        self._prev = (xc[-1].clone(), mom.select(slice(-1, None)))  # (1, C) moments: small, kept as views

    def _windowed(self, x: torch.Tensor) -> None:
        """Windowed SSIM per map (no moment form), and its null with the previous image."""
        o = self.options
        kw = {"window": o["window"], "c1": o["c1"], "c2": o["c2"]}
        self._add("sim.ssim-windowed", windowed_ssim_matrix(x, **kw).sum(dim=0))
        if "null" in self.metrics:
            paired, with_prev = _paired(self._position, x.shape[0])
            if paired.numel():
                self._add("null.ssim-windowed", windowed_ssim_matrix(x[paired], other=x[paired - 1], **kw).sum(dim=0))
            if with_prev:
                self._add("null.ssim-windowed", windowed_ssim_matrix(x[:1], other=self._prev_raw, **kw).sum(dim=0))
            self._prev_raw = x[-1:].clone()

    def _update_pooled(self, x: torch.Tensor) -> None:
        x64 = x.to(torch.float64)  # (B, C): one value per channel and image, tiny
        self._raise_max(x64.amax(0), x64.amin(0))
        self._add("gram", x64.T @ x64)
        self._add("channel_sum", x64.sum(0))
        if "null" in self.metrics:
            paired, with_prev = _paired(self._position, x64.shape[0])
            if paired.numel():
                self._add("cross", x64[paired].T @ x64[paired - 1])
            if with_prev:
                self._add("cross", torch.outer(x64[0], self._prev))
            self._prev = x64[-1].clone()
        self._count(x64.shape[0], x64.shape[0])

    @property
    def images(self) -> int:
        """Number of images accumulated."""
        return int(self._state["images"].item())

    @property
    def pixels(self) -> int:
        """Number of pixels accumulated per channel (sum of H*W over images)."""
        return int(self._state["pixels"].item())

    def _need(self, metric: str) -> None:
        if metric not in self.metrics:
            tracked = ", ".join(sorted(self.metrics)) or "nothing"
            raise SimpruneError(f"statistic {metric!r} was not tracked (tracking {tracked})")
        if self.images == 0:
            raise SimpruneError("no calibration images were accumulated; call update() first")

    def _pooled_moments(self) -> tuple[MapMoments, torch.Tensor]:
        n = self._state["images"]
        mean = self._state["channel_sum"] / n
        cov = self._state["gram"] / n - torch.outer(mean, mean)
        lo = -self._state["max.neg_lo"]
        return MapMoments(mean, cov.diagonal().clamp_min(0.0), lo, self._state["max.hi"] - lo), cov

    def _kw(self) -> dict:
        o = self.options
        return {"c1": o["c1"], "c2": o["c2"], "cap": o["psnr_cap"]}

    def similarity(self, metric: str) -> torch.Tensor:
        """(C, C) similarity averaged over images (QSFM / SFS); pooled probes: of the vectors over images."""
        if metric not in SIMILARITIES:
            raise SimpruneError(f"unknown similarity {metric!r}; choose from {', '.join(SIMILARITIES)}")
        self._need(metric)
        if not self.pooled:
            S = self._state[f"sim.{metric}"] / self._state["images"]
        else:
            mom, cov = self._pooled_moments()
            S = similarity_from_moments("ssim" if metric == "ssim-windowed" else metric, mom, mom, cov, **self._kw())
            S.fill_diagonal_(self.options["psnr_cap"] if metric == "psnr" else 1.0)
        S = mirror_upper(S)  # spatial sums hold the upper triangle; pooled ones are symmetric up to rounding
        return S.clamp(-1.0, 1.0) if metric != "psnr" else S

    def null_similarity(self, metric: str) -> torch.Tensor:
        """(C, C) similarity of unrelated maps (channel i of one image, j of its partner; the upper
        triangle mirrored, not averaged with the lower one, which would halve its variance): the chance
        level of ``similarity(metric)``. Zero when no pair was seen (fewer than two images)."""
        self._need("null")
        self._need(metric)
        pairs = self._state["null_images"]
        if pairs == 0:
            return torch.zeros(self.channels, self.channels, dtype=torch.float64)
        if not self.pooled:
            S = self._state[f"null.{metric}"] / pairs
        else:
            mom, _ = self._pooled_moments()
            cross = self._state["cross"] / pairs - torch.outer(mom.mean, mom.mean)
            S = similarity_from_moments("ssim" if metric == "ssim-windowed" else metric, mom, mom, cross,
                                        **self._kw())
        S = S.clamp(-1.0, 1.0) if metric != "psnr" else S
        upper = torch.triu(S, diagonal=1)  # one shifted pair per channel pair: symmetric, same variance as S
        return upper + upper.T + torch.diag(S.diagonal())

    def mstd(self) -> torch.Tensor:
        """(C,) mean over images of each channel's spatial std (DFS's M-std); pooled: std over images."""
        self._need("mstd")
        if self.pooled:
            return self._pooled_moments()[0].var.sqrt()
        return self._state["mstd"] / self._state["images"]

    def mean_rank(self) -> torch.Tensor:
        """(C,) mean over images of each channel's map rank (HRank); pooled: 1 unless the channel is 0."""
        self._need("rank")
        if self.pooled:
            return ((self._state["max.hi"] > 0) | (self._state["max.neg_lo"] > 0)).double()
        return self._state["rank"] / self._state["images"]

    def rank_fraction(self) -> torch.Tensor:
        """(C,) mean rank as a fraction of the full rank min(H, W): comparable across map sizes."""
        if self.pooled:
            return self.mean_rank()
        return self.mean_rank() * self._state["images"] / self._state["rank_full"].clamp_min(1.0)

    def constant_channels(self) -> torch.Tensor:
        """(C,) True where a channel took one value on every pixel of every image (e.g. dead after ReLU)."""
        if self.images == 0:
            raise SimpruneError("no calibration images were accumulated; call update() first")
        return self._state["max.hi"] == -self._state["max.neg_lo"]

    def gram(self) -> torch.Tensor:
        """(C, C) sum over images and pixels of x x^T on raw maps (for compensation fits)."""
        if not self.pooled:
            self._need("gram")
        if "gram" not in self._mirrored:  # spatial sums hold the upper triangle (cached: read per channel pair)
            self._mirrored["gram"] = mirror_upper(self._state["gram"])
        return self._mirrored["gram"]

    def channel_sum(self) -> torch.Tensor:
        """(C,) sum over images and pixels of each raw channel."""
        if not self.pooled:
            self._need("gram")
        return self._state["channel_sum"]

    def tensors(self) -> dict[str, torch.Tensor]:
        """All state (clones): summing these across processes merges the statistics, except the
        ``max.*`` entries, which merge by maximum."""
        return {n: t.clone() for n, t in self._state.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], channels: int | None = None, metrics=None,
                     **options) -> "ChannelStats":
        """Rebuild from ``tensors()`` output (e.g. after an all-reduce); options as in __init__.
        ``metrics`` defaults to what the spatial state names say."""
        if metrics is None:
            skip = _COUNTS + _MAXIMA + ("channel_sum", "rank_full", "cross")
            metrics = {n.split(".", 1)[1] if n.startswith("sim.") else "null" if n.startswith("null.") else n
                       for n in tensors if n not in skip}
        shapes = [t.shape[0] for n, t in tensors.items() if n not in _COUNTS]
        if channels is None:
            if not shapes:
                raise SimpruneError("cannot infer the channel count from counts alone; pass channels=")
            channels = shapes[0]
        stats = cls(channels, metrics, **options)
        missing = sorted(set(stats._state) - set(tensors))
        if missing or any(s != channels for s in shapes):
            raise SimpruneError(f"inconsistent ChannelStats tensors (missing {missing}, channels {shapes})")
        for name in stats._state:
            stats._state[name].copy_(tensors[name].to(torch.float64))
        stats._mirrored.clear()
        return stats

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Add another object's sums (and maxima) into this one (same channels, metrics, options)."""
        if (other.channels, other.metrics, other.options) != (self.channels, self.metrics, self.options):
            raise SimpruneError("can only merge ChannelStats with the same channels, metrics and options")
        self._mirrored.clear()
        for name, t in other._state.items():
            if name in _MAXIMA:
                self._state[name] = torch.maximum(self._state[name], t.to(self.device))
            else:
                self._add(name, t)
        return self

    def to(self, device: str | torch.device) -> "ChannelStats":
        """Move all state to ``device`` (e.g. CUDA for an NCCL all-reduce); returns self."""
        self.device = torch.device(device)
        self._state = {n: t.to(self.device) for n, t in self._state.items()}
        self._mirrored.clear()
        return self


def is_maximum(name: str) -> bool:
    """True for ``tensors()`` entries that combine across processes by maximum, not by sum."""
    return name in _MAXIMA


def _row_blocks(channels: int) -> list[tuple[int, int]]:
    """Row blocks (r0, r1) of the upper-triangular products (see :func:`_upper_products`)."""
    if channels < SPLIT_FROM:
        return [(0, channels)]
    step = -(-channels // PRODUCT_BLOCKS)
    return [(r0, min(channels, r0 + step)) for r0 in range(0, channels, step)]


def _upper_products(a: torch.Tensor, b: torch.Tensor, blocks: list[tuple[int, int]]) -> list:
    """[(r0, r1, (B, r1 - r0, C - r0) float32 a[:, r0:r1] b[:, r0:]^T / P)] for centred maps a, b (B, C, P):
    every pair (i, j >= i) once. The similarity and the null are read from their upper triangles only
    (the first symmetric, the second mirrored by design), so the rest of the product is not computed."""
    P = a.shape[-1]
    return [(r0, r1, torch.bmm(a[:, r0:r1], b[:, r0:].transpose(1, 2)).div_(P)) for r0, r1 in blocks]


def mirror_upper(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``m``'s."""
    return torch.triu(m) + torch.triu(m, diagonal=1).T


def _paired(start: int, n: int) -> tuple[torch.Tensor, bool]:
    """Null pairs among ``n`` images at stream positions ``start``...: the local indices i >= 1 of images
    that do not open a block of NULL_BLOCK (each paired with image i - 1), and whether image 0 is paired
    (with the last image of the previous batch)."""
    inner = [i for i in range(1, n) if (start + i) % NULL_BLOCK]
    return torch.tensor(inner, dtype=torch.long), n > 0 and start % NULL_BLOCK != 0


def fit_compensation(stats: ChannelStats, i: int, j: int, affine: bool = False) -> tuple[float, float]:
    """Least-squares x_j ~ a * x_i (+ b) over all calibration pixels, from the accumulated sums.

    Used to fold a dropped channel j into its kept twin i. Zero-energy x_i gives (0, mean x_j if
    affine else 0); a constant x_i with ``affine`` is absorbed into b, giving (0, mean x_j)."""
    G, s, n = stats.gram(), stats.channel_sum(), stats.pixels
    gii, gij = float(G[i, i]), float(G[i, j])
    mean_j = float(s[j]) / n if n > 0 else 0.0
    if gii <= 0.0:
        return 0.0, (mean_j if affine else 0.0)
    if not affine:
        return gij / gii, 0.0
    si, sj = float(s[i]), float(s[j])
    var = gii - si * si / n
    if var <= 1e-12 * gii:
        return 0.0, mean_j
    a = (gij - si * sj / n) / var
    return a, (sj - a * si) / n
