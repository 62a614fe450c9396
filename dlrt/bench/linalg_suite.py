"""The linalg suite: the QR and SVD calls of one adaptive step at the real shapes, as the optimizer makes them (one
call per layer; the variant this device takes is marked "(now)"), against batched, Cholesky-based and host
alternatives: the evidence for dlrt.linalg's choices. Then the SVD of the timing study's 2r x 2r cores at larger
ranks, where the SVD driver, not the launch cost, decides."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from dlrt import integrators as ig
from dlrt import linalg
from dlrt.layers import low_rank_layers
from dlrt.placement import HOST_SVD_MAX_SIZE

from .cases import Case, build, step_cases
from .output import Meta, table
from .timing import CpuShare, device_sync, quantile, summary, wait_for_idle

# ranks whose 2r x 2r cores the suite also factorises: where the timing study's adaptive step is slow
# on a GPU (a CPU takes the first two: 640 would add minutes)
CORE_RANKS = (80, 160, 640)


def _cholesky_qr2(A: torch.Tensor) -> torch.Tensor:
    """Q of a thin QR via two Cholesky-QR passes (matmuls + an r x r Cholesky): fine for well-conditioned A."""
    for _ in range(2):
        R = torch.linalg.cholesky(A.mT @ A, upper=True)
        A = torch.linalg.solve_triangular(R, A, upper=True, left=False)
    return A


def _padded(mats: list[torch.Tensor]) -> torch.Tensor:
    rows = max(m.shape[-2] for m in mats)
    cols = max(m.shape[-1] for m in mats)
    return torch.stack([F.pad(m, (0, cols - m.shape[-1], 0, rows - m.shape[-2])) for m in mats])


def linalg_shapes(case: Case, device) -> tuple[list[tuple[int, int, int]], list[int]]:
    """(rows, rank, new directions) of the factors U and V, and the SVD cores, of one adaptive step at
    the case's ranks."""
    model = build(case, device, low_rank=True)
    factors, cores = [], []
    for layer in low_rank_layers(model):
        r = layer.rank
        count = ig.augmentation_size(r, layer.out_dim, layer.in_dim)
        factors += [(layer.out_dim, r, count), (layer.in_dim, r, count)]
        cores.append(r + count)
    return factors, cores


def _time_variants(variants: dict, reps: int, sync, fields: dict) -> list[dict]:
    """Median ms of each variant (a callable) over `reps` calls after 3 warm-up calls, one row each."""
    rows = []
    for name, fn in variants.items():
        share = CpuShare()
        try:
            for _ in range(3):
                fn()
            times, cpu_times = [], []
            for _ in range(reps):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
                cpu_times.append((time.process_time() - c0) * 1e3)
        except RuntimeError as error:  # e.g. a Cholesky of a singular padded Gram matrix
            rows.append({"suite": "linalg", **fields, "variant": name, "median_ms": float("nan"),
                         "note": f"failed: {str(error).splitlines()[0][:80]}"})
            continue
        rows.append({"suite": "linalg", **fields, "variant": name, **summary(times),
                     "cpu_ms": quantile(cpu_times, 0.5), "note": "", "others_cpu_pct": share.others_pct()})
    return rows


def _test_cores(sizes: list[int], g: torch.Generator, device) -> list[torch.Tensor]:
    """Nearly diagonal cores with singular values in [0.1, 1.1], like an S-step's."""
    return [(torch.diag(torch.rand(k, generator=g) + 0.1) + 1e-3 * torch.randn(k, k, generator=g)).to(device)
            for k in sizes]


def _svd_variants(Ss: list[torch.Tensor], device, svd_on: str) -> dict:
    """Ways to get the SVD of each core; the one DLRTOptimizer takes here (by svd_on and the cores' sizes) is marked
    "(now)"."""
    on_host = device.type == "cuda" and (svd_on == "host" or
                                         (svd_on == "auto" and max(S.shape[0] for S in Ss) <= HOST_SVD_MAX_SIZE))
    here = {True: " (now)", False: ""}
    variants = {
        f"svd: loop torch.linalg.svd{here[not on_host]}": lambda: [linalg.svd(S) for S in Ss],
        "svd: loop eigh(S S^T)": lambda: [torch.linalg.eigh(S @ S.mT) for S in Ss],
    }
    if device.type == "cuda":  # cuSOLVER's drivers by name; torch's default checks gesvdj's convergence on the host
        variants["svd: loop torch.linalg.svd(driver='gesvdj')"] = lambda: [
            torch.linalg.svd(S, driver="gesvdj") for S in Ss]
        variants["svd: loop torch.linalg.svd(driver='gesvd')"] = lambda: [
            torch.linalg.svd(S, driver="gesvd") for S in Ss]
        if on_host or max(S.shape[0] for S in Ss) <= 512:  # one thread would take seconds on the larger cores
            variants[f"svd: on the host, one copy each way, 1 thread{here[on_host]}"] = lambda: linalg.svds_on_host(Ss)
    return variants


def run(args, device: torch.device, meta: Meta) -> list[dict]:
    """One step's worth of QR and SVD at the real shapes, then the timing study's cores."""
    rows = []
    sync = device_sync(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    here = {True: " (now)", False: ""}
    on_cpu = device.type == "cpu"  # the CPU takes the checked shortcut: the projected QR
    for case in step_cases(args.quick)[:2]:
        wait_for_idle(args.wait_idle)
        factors, cores = linalg_shapes(case, device)
        bases = [(torch.linalg.qr(torch.randn(n, r, generator=g))[0].to(device),
                  torch.randn(n, r, generator=g).to(device), count) for n, r, count in factors]
        As = [torch.cat([U0, dK], 1) for U0, dK, _ in bases]
        Ss = _test_cores(cores, g, device)
        As_pad, Ss_pad = _padded(As), _padded(Ss)
        variants = {
            f"qr: full QR of [U0, dK]{here[not on_cpu]}":
                lambda: [linalg.new_directions(*b, projected=False) for b in bases],
            f"qr: projected, half the width{here[on_cpu]}":
                lambda: [linalg.new_directions(*b, projected=True) for b in bases],
            "qr: one batched torch.linalg.qr of [U0, dK], zero-padded": lambda: torch.linalg.qr(As_pad),
            "qr: loop CholeskyQR2 of [U0, dK]": lambda: [_cholesky_qr2(A) for A in As],
            **_svd_variants(Ss, device, args.svd_on),
            "svd: one batched torch.linalg.svd, zero-padded": lambda: torch.linalg.svd(Ss_pad),
            "svd: loop torch.linalg.svdvals": lambda: [torch.linalg.svdvals(S) for S in Ss],
            "svd: batched eigh(S S^T), zero-padded": lambda: torch.linalg.eigh(Ss_pad @ Ss_pad.mT),
        }
        if device.type == "cuda":  # small factorisations may be cheaper on the host, copies included
            variants["svd: loop on the CPU, copies included"] = lambda: [
                [t.to(device) for t in torch.linalg.svd(S.cpu())] for S in Ss]
            variants["qr: loop on the CPU, copies included"] = lambda: [
                [t.to(device) for t in torch.linalg.qr(A.cpu())] for A in As]
        fields = {"case": case.name, "qr_shapes": " ".join(f"{n}x{2 * r}" for n, r, _ in factors),
                  "svd_sizes": " ".join(str(k) for k in cores)}
        rows += _time_variants(variants, args.linalg_reps, sync, {**fields, **meta.fields})
    for rank in (4,) if args.quick else CORE_RANKS if device.type == "cuda" else CORE_RANKS[:2]:
        wait_for_idle(args.wait_idle)
        Ss = _test_cores([2 * rank] * 4, g, device)
        fields = {"case": f"timing_study_r{rank}", "qr_shapes": "", "svd_sizes": " ".join(str(S.shape[0]) for S in Ss)}
        rows += _time_variants(_svd_variants(Ss, device, args.svd_on), min(args.linalg_reps, 5), sync,
                               {**fields, **meta.fields})
    return rows


def report(rows: list[dict], args, meta: Meta, say) -> None:
    say("\n== one adaptive step's QR and SVD calls at the real shapes (median ms for all layers) ==")
    for case in dict.fromkeys(r["case"] for r in rows):
        case_rows = [r for r in rows if r["case"] == case]
        shapes = case_rows[0].get("qr_shapes") and f"QR inputs {case_rows[0]['qr_shapes']}; "
        say(f"\n-- {case}: {shapes or ''}SVD cores {case_rows[0].get('svd_sizes', '')} --")
        say(table(case_rows, ["variant", "median_ms", "p25_ms", "p75_ms", "cpu_ms", "others_cpu_pct", "note"]))
