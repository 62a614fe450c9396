"""Where and how a step computes: the implementation switches of a param group (as torch's `foreach` and `fused`),
decided in one place. None of them changes the step's mathematics; each changes its speed or its memory.

`svd_on`: where the cores' SVDs are taken: "device", "host" (LAPACK on one CPU thread, the cores copied over and
back in one copy each) or "auto": on the host for a GPU step whose cores are all at most HOST_SVD_MAX_SIZE.
`checked_shortcuts`: whether to take the CPU's self-checking QRs (dlrt.linalg); None chooses by device.
`layerwise`: whether a rank-changing step runs one layer at a time (less memory, the same results bit for bit);
None: on a CPU for factors larger than LAYERWISE_MIN_BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import linalg

SVD_PLACES = ("auto", "device", "host")
# svd_on="auto" takes the SVDs of a GPU step's cores on the host when none is larger than this. On an H100 the
# host was quicker at LeNet5's (18-56) and the FC net's (70-106) cores, the GPU at the timing study's 160 and up
# (results/bench/gpu/README.md).
HOST_SVD_MAX_SIZE = 128
# layerwise=None takes a rank-changing CPU step one layer at a time when the factors U, V of all layers hold more
# than this: below it the per-layer calls cost more time than the memory they save is worth (LeNet5 and the FC nets
# stay batched; the timing study's factors hold 3 MiB at rank 20, 13 at 80, 105 at 640).
LAYERWISE_MIN_BYTES = 8 * 2 ** 20
DEFAULTS = {"svd_on": "auto", "checked_shortcuts": None, "layerwise": None}


def factor_numel(layer) -> int:
    return layer.U.numel() + layer.V.numel()


@dataclass(frozen=True)
class Placement:
    svd_on: str = "auto"
    checked_shortcuts: bool | None = None
    layerwise: bool | None = None

    @classmethod
    def of(cls, groups: list[dict]) -> "Placement":
        """The placement the groups ask for. One step takes all its SVDs in one place, so its groups must agree."""
        found = {key: {group[key] for group in groups} for key in DEFAULTS}
        for key, values in found.items():
            if len(values) > 1:
                raise ValueError(f"{key} differs between the low-rank param groups ({', '.join(map(repr, values))}): a "
                                 f"step takes the factorisations of all groups together; give every group one value")
        return cls(**{key: values.pop() if values else DEFAULTS[key] for key, values in found.items()})

    @staticmethod
    def check(group: dict) -> None:
        if group["svd_on"] not in SVD_PLACES:
            raise ValueError(f"unknown svd_on {group['svd_on']!r}: choose one of {', '.join(SVD_PLACES)}")
        for key in ("checked_shortcuts", "layerwise"):
            if group[key] not in (None, True, False):
                raise ValueError(f"{key} must be True, False or None (chosen by device), got {group[key]!r}")

    def takes_checked_shortcuts(self, layers: list) -> bool:
        """Whether the step takes the CPU's self-checking QR (as asked, or by the factors' device)."""
        if self.checked_shortcuts is not None:
            return self.checked_shortcuts
        return bool(layers) and linalg.checked_shortcuts_by_default(layers[0].U)

    def svds_on_host(self, cores: list[torch.Tensor]) -> bool:
        if self.svd_on != "auto":
            return self.svd_on == "host"
        return cores[0].is_cuda and max(core.shape[0] for core in cores) <= HOST_SVD_MAX_SIZE

    def layer_by_layer(self, layers: list) -> bool:
        """Whether a rank-changing step goes one layer at a time: as asked, or when the factors are on a CPU, where
        host reads are free, and hold more than LAYERWISE_MIN_BYTES."""
        if self.layerwise is not None:
            return self.layerwise
        if not layers or layers[0].U.device.type != "cpu":
            return False
        return sum(map(factor_numel, layers)) * layers[0].U.element_size() > LAYERWISE_MIN_BYTES
