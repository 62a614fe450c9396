"""Which of the calls a DLRT step makes can a CUDA graph hold, in this torch on this GPU?

    python scripts/probe_graph_capture.py --out results/bench/gpu/capture     # on a GPU machine
    python scripts/probe_graph_capture.py --device cpu                         # here: checks the checks only

A graph cannot hold a host synchronisation, and some torch.linalg calls synchronise inside C++ to check
their results (torch's CUDA SVD checks gesvdj's convergence and every call's `info`). Each call is captured
in a process of its own, because a failed capture can leave the CUDA context unusable, and the replay is
compared with the eager result on new input. On the CPU (no graphs) it only runs the calls and their checks.
Writes capture.csv and capture.txt into --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import subprocess
import sys

import torch


def _reconstructs(A, *factors, rtol=1e-3) -> bool:
    return torch.allclose(torch.linalg.multi_dot(factors), A, atol=rtol * A.abs().max().item())


def _spd(n, device):
    X = torch.randn(n, n, device=device)
    return X @ X.T + n * torch.eye(n, device=device)


# name -> (make the input, the call, whether the call's output is right for that input)
PROBES = {
    "linalg.qr 500x56": (
        lambda d: torch.randn(500, 56, device=d),
        lambda A: torch.linalg.qr(A),
        lambda A, out: _reconstructs(A, out[0], out[1])),
    "linalg.svd 56x56 (default driver)": (
        lambda d: torch.randn(56, 56, device=d),
        lambda A: torch.linalg.svd(A),
        lambda A, out: _reconstructs(A, out[0] * out[1], out[2])),
    "linalg.svd 56x56 driver=gesvd": (
        lambda d: torch.randn(56, 56, device=d),
        lambda A: torch.linalg.svd(A, driver="gesvd" if A.is_cuda else None),
        lambda A, out: _reconstructs(A, out[0] * out[1], out[2])),
    "linalg.svdvals 56x56": (
        lambda d: torch.randn(56, 56, device=d),
        lambda A: torch.linalg.svdvals(A),
        lambda A, out: torch.allclose(out.square().sum(), A.square().sum(), rtol=1e-3)),
    "linalg.eigh 56x56": (
        lambda d: _spd(56, d),
        lambda A: torch.linalg.eigh(A),
        lambda A, out: _reconstructs(A, out[1] * out[0], out[1].T)),
    "linalg.cholesky_ex 56x56": (
        lambda d: _spd(56, d),
        lambda A: torch.linalg.cholesky_ex(A),
        lambda A, out: _reconstructs(A, out[0], out[0].T)),
    "linalg.solve_triangular 56x56": (
        lambda d: torch.linalg.cholesky(_spd(56, d)),
        lambda L: torch.linalg.solve_triangular(L, torch.eye(56, device=L.device), upper=False),
        lambda L, out: torch.allclose(L @ out, torch.eye(56, device=L.device), atol=1e-3)),
    "copy to pinned host memory and back": (
        lambda d: torch.randn(56, 56, device=d),
        lambda A: _round_trip(A),
        lambda A, out: torch.equal(out, A)),
}


_PINNED = {}  # made in the warm-up: a graph cannot allocate host memory


def _round_trip(A):
    """Device -> pinned host buffer -> device, as a step that takes its SVDs on the host would copy."""
    if A.shape not in _PINNED:
        _PINNED[A.shape] = torch.empty(A.shape, dtype=A.dtype, pin_memory=A.is_cuda)
    host = _PINNED[A.shape]
    host.copy_(A, non_blocking=True)
    return host.to(A.device, non_blocking=True)


def probe_one(name: str, device: str) -> dict:
    """Capture one call in a graph, replay it on new input, check the result; on the CPU, run it eagerly."""
    make, call, right = PROBES[name]
    torch.manual_seed(0)
    x = make(device)
    row = {"call": name, "captured": "", "replay_right": "", "eager_right": bool(right(x, call(x))), "error": ""}
    if device == "cpu":
        return row
    row["captured"] = False
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                call(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(x)
        row["captured"] = True
        x.copy_(make(device))
        graph.replay()
        torch.cuda.synchronize()
        row["replay_right"] = bool(right(x, out))
    except Exception as error:  # the message is the finding: the first error, not the failed capture's end
        while error.__context__ is not None:
            error = error.__context__
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    return row


def probe_all(device: str) -> list[dict]:
    if device == "cpu":
        return [probe_one(name, device) for name in PROBES]

    def child(name):
        done = subprocess.run([sys.executable, __file__, "--one", name, "--device", device],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return {"call": name, "captured": False, "replay_right": "", "eager_right": "",
                    "error": f"process exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
        return json.loads(done.stdout.strip().splitlines()[-1])

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(PROBES)) as pool:
        return list(pool.map(child, PROBES))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None, help="folder for capture.csv and capture.txt")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one probe, JSON out
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(probe_one(args.one, args.device)))
        return 0
    rows = probe_all(args.device)
    header = f"torch {torch.__version__}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}"
    lines = [header] + [f"{r['call']:<40} captured={r['captured']!s:<5} replay_right={r['replay_right']!s:<5} "
                        f"eager_right={r['eager_right']!s:<5} {r['error']}" for r in rows]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "capture.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(args.out, "capture.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if all(r["eager_right"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
