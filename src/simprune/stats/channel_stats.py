"""Running per-channel statistics of one probe point's feature maps over calibration images.

Every piece of state is a float64 sum (plus image and pixel counts), so batches can be fed one
at a time in bounded memory, and statistics gathered by several processes combine by summing
their ``tensors()`` (an all-reduce) or by ``merge``. Maps themselves are never stored.
"""
from __future__ import annotations

import torch

from simprune.errors import SimpruneError
from simprune.stats.similarity import C1, C2, SIMILARITIES, map_rank, spatial_std

METRICS = ("ssim", "ssim-windowed", "psnr", "cosine", "mstd", "rank", "gram")
_COUNTS = ("images", "pixels")


def _state_names(metrics) -> list[str]:
    """Names of the sum tensors that the given metrics need, in a fixed order."""
    names = [f"sim.{m}" for m in SIMILARITIES if m in metrics]
    names += [m for m in ("mstd", "rank") if m in metrics]
    if "gram" in metrics:
        names += ["gram", "channel_sum"]
    return names


class ChannelStats:
    """Sums over calibration images of pairwise similarities, M-std, map rank and the raw Gram."""

    def __init__(
        self,
        channels: int,
        metrics,
        *,
        window: int = 7,
        c1: float = C1,
        c2: float = C2,
        psnr_cap: float = 100.0,
        device: str | torch.device = "cpu",
    ):
        """Track ``metrics`` (a subset of METRICS) for maps with ``channels`` channels."""
        metrics = frozenset(metrics)
        unknown = sorted(metrics - set(METRICS))
        if unknown:
            choices = ", ".join(METRICS)
            raise SimpruneError(f"unknown statistic(s) {', '.join(unknown)}; choose from {choices}")
        if channels < 1:
            raise SimpruneError(f"ChannelStats needs at least one channel, got {channels}")
        self.channels = int(channels)
        self.metrics = metrics
        self.options = {"window": window, "c1": c1, "c2": c2, "psnr_cap": psnr_cap}
        self.device = torch.device(device)
        C = self.channels
        self._state = {n: torch.zeros((), dtype=torch.float64, device=self.device) for n in _COUNTS}
        for name in _state_names(metrics):
            shape = (C, C) if name.startswith("sim.") or name == "gram" else (C,)
            self._state[name] = torch.zeros(shape, dtype=torch.float64, device=self.device)

    def _per_image(self, metric: str, maps: torch.Tensor) -> torch.Tensor:
        """The (B, C, C) similarity of one batch under this object's options."""
        o = self.options
        if metric in ("ssim", "ssim-windowed"):
            extra = {"window": o["window"]} if metric == "ssim-windowed" else {}
            return SIMILARITIES[metric](maps, c1=o["c1"], c2=o["c2"], **extra)
        if metric == "psnr":
            return SIMILARITIES[metric](maps, cap=o["psnr_cap"])
        return SIMILARITIES[metric](maps)

    def _add(self, name: str, value: torch.Tensor) -> None:
        """Accumulate a float64 sum into the state tensor ``name``."""
        self._state[name] += value.to(device=self.device, dtype=torch.float64)

    @torch.no_grad()
    def update(self, maps: torch.Tensor) -> None:
        """Add one batch of maps (B, C, H, W); each image counts once in every mean."""
        if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or maps.shape[1] != self.channels:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise SimpruneError(f"expected feature maps (B, {self.channels}, H, W), got {shape}")
        if not bool(torch.isfinite(maps).all()):
            raise SimpruneError("feature maps contain NaN or inf; check the model and calibration data")
        x = maps.detach()
        B, _, H, W = x.shape
        for name in _state_names(self.metrics):
            if name.startswith("sim."):
                self._add(name, self._per_image(name[4:], x).sum(dim=0))
        if "mstd" in self.metrics:
            self._add("mstd", spatial_std(x).sum(dim=0))
        if "rank" in self.metrics:
            self._add("rank", map_rank(x).sum(dim=0))
        if "gram" in self.metrics:
            flat = x.to(torch.float64).transpose(0, 1).reshape(self.channels, -1)
            self._add("gram", flat @ flat.T)
            self._add("channel_sum", flat.sum(dim=1))
        self._state["images"] += B
        self._state["pixels"] += B * H * W

    @property
    def images(self) -> int:
        """Number of images accumulated."""
        return int(self._state["images"].item())

    @property
    def pixels(self) -> int:
        """Number of pixels accumulated per channel (sum of H*W over images)."""
        return int(self._state["pixels"].item())

    def _get(self, name: str, metric: str) -> torch.Tensor:
        """State tensor ``name``, refusing untracked metrics."""
        if metric not in self.metrics:
            tracked = ", ".join(sorted(self.metrics)) or "nothing"
            raise SimpruneError(f"statistic {metric!r} was not tracked (tracking {tracked})")
        return self._state[name]

    def _mean(self, name: str, metric: str) -> torch.Tensor:
        """Per-image mean of a tracked sum; there must be at least one image."""
        total = self._get(name, metric)
        if self.images == 0:
            raise SimpruneError("no calibration images were accumulated; call update() first")
        return total / self._state["images"]

    def similarity(self, metric: str) -> torch.Tensor:
        """(C, C) similarity averaged over images (QSFM / SFS)."""
        if metric not in SIMILARITIES:
            raise SimpruneError(f"unknown similarity {metric!r}; choose from {', '.join(SIMILARITIES)}")
        return self._mean(f"sim.{metric}", metric)

    def mstd(self) -> torch.Tensor:
        """(C,) mean over images of each channel's spatial std (DFS's M-std)."""
        return self._mean("mstd", "mstd")

    def mean_rank(self) -> torch.Tensor:
        """(C,) mean over images of each channel's map rank (HRank)."""
        return self._mean("rank", "rank")

    def gram(self) -> torch.Tensor:
        """(C, C) sum over images and pixels of x x^T on raw maps (for compensation fits)."""
        return self._get("gram", "gram")

    def channel_sum(self) -> torch.Tensor:
        """(C,) sum over images and pixels of each raw channel."""
        return self._get("channel_sum", "gram")

    def tensors(self) -> dict[str, torch.Tensor]:
        """All state as sums (clones): summing these across processes merges the statistics."""
        return {n: t.clone() for n, t in self._state.items()}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], channels: int | None = None, **options
    ) -> "ChannelStats":
        """Rebuild from ``tensors()`` output (e.g. after an all-reduce); options as in __init__."""
        skip = _COUNTS + ("channel_sum",)
        metrics = {n[4:] if n.startswith("sim.") else n for n in tensors if n not in skip}
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
        return stats

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Add another object's sums into this one (same channels, metrics, options); returns self."""
        if (other.channels, other.metrics, other.options) != (self.channels, self.metrics, self.options):
            raise SimpruneError("can only merge ChannelStats with the same channels, metrics and options")
        for name, t in other._state.items():
            self._add(name, t)
        return self

    def to(self, device: str | torch.device) -> "ChannelStats":
        """Move all state to ``device`` (e.g. CUDA for an NCCL all-reduce); returns self."""
        self.device = torch.device(device)
        self._state = {n: t.to(self.device) for n, t in self._state.items()}
        return self


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
