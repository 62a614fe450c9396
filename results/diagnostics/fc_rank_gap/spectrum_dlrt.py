"""What dlrt's rank adaption sees in the FC runs (issue 24, ERRATA finding 6): per layer, at a few batches of the
rank-adaptive phase, the augmented core's spectrum and the rank its cut keeps, in the format of their code's probe
(`../fc_published_tf/published_fc.py spectrum`), so that both can be read side by side.

    python results/diagnostics/fc_rank_gap/spectrum_dlrt.py --tau 0.07 [--experiment fc_mnist_authors] [--at 1 20 ...]

It runs the experiment's first batches exactly as `dlrt-run experiment=<experiment> tau=<ϑ>` does (same config, data,
seed, model and optimizer; one process, one thread) and, at the chosen steps, records what the step's truncation
decided from: the singular values of each layer's augmented core (after the S-step at the augmented bases) and the
rank it kept (dlrt.integrators.truncation_rank_tensor, wrapped here to record its arguments and its answer).
Writes spectrum_dlrt_<experiment>_tau<ϑ>.txt beside this script.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def cut_line(step: int, index: int, sigma: torch.Tensor, r: int, tau: float) -> str:
    """One layer's cut: the augmented core's size p, σ_1, the rank r kept, σ_r, σ_r+1, σ_r / σ_1, how flat the
    kept part is (σ_r over the root mean square of σ_1..σ_r) and ϑ‖σ‖."""
    p, sigma = sigma.numel(), sigma.double()
    after = f"{sigma[r]:.4f}" if r < p else "–"
    rms = sigma[:r].square().mean().sqrt()
    return (f"step {step:4d} layer {index + 1}: p {p:3d}  σ_1 {sigma[0]:.3f}  σ_r {sigma[r - 1]:.3f}  σ_r+1 {after}  "
            f"σ_r/σ_1 {sigma[r - 1] / sigma[0]:.2f}  σ_r/σ_rms {sigma[r - 1] / rms:.2f}  "
            f"ϑ‖σ‖ {tau * sigma.norm():.3f}  -> rank {r}")


@contextlib.contextmanager
def recorded_cuts():
    """While open, the optimizer's truncation rule leaves the spectra and ranks of its latest call in the dict
    yielded (each step of the one-pass method calls it once, for all layers)."""
    from dlrt import integrators

    seen, rule = {}, integrators.truncation_rank_tensor

    def recorded(sigmas, *args, **kwargs):
        ranks = rule(sigmas, *args, **kwargs)
        seen["sigmas"], seen["ranks"] = [s.detach().cpu() for s in sigmas], ranks.reshape(-1).tolist()
        return ranks

    integrators.truncation_rank_tensor = recorded
    try:
        yield seen
    finally:
        integrators.truncation_rank_tensor = rule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="fc_mnist", choices=["fc_mnist", "fc_mnist_authors"])
    parser.add_argument("--tau", type=float, required=True)
    parser.add_argument("--at", type=int, nargs="+", default=[1, 20, 60, 150, 1000], help="steps after which to look")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)

    import torch.nn.functional as F

    from dlrt.experiments.cli import compose_config
    from dlrt.experiments.data import load_device_data
    from dlrt.experiments.runtime import Workers, configure_cpu, make_model, make_optimizer

    cfg = compose_config([f"experiment={args.experiment}", f"tau={args.tau}", "threads=1"])
    configure_cpu(cfg)
    torch.manual_seed(cfg.seed)  # as train.train: the model's draw, then the batches' generator
    device = torch.device("cpu")
    data = load_device_data(cfg, device, Workers())
    model = make_model(cfg, data.input_shape, data.num_classes)
    optimizer = make_optimizer(cfg, model, cfg.method.name)
    generator = torch.Generator().manual_seed(cfg.seed)
    lines = [f"dlrt, experiment={args.experiment}, ϑ = {args.tau:g}, seed {cfg.seed}: per layer the augmented core's "
             "size p, σ_1, the rank r kept, σ_r, σ_r+1, σ_r / σ_1, σ_r / rms(σ_1..σ_r) and ϑ‖σ‖"]
    with recorded_cuts() as cut:
        step, last = 0, max(args.at)
        while step < last:
            for xb, yb, *_ in data.train_batches(generator):
                def closure(xb=xb, yb=yb):
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                optimizer.step(closure)
                step += 1
                if step in args.at:
                    cuts = [cut_line(step, i, sigma, r, args.tau)
                            for i, (sigma, r) in enumerate(zip(cut["sigmas"], cut["ranks"]))]
                    print("\n".join(cuts), flush=True)
                    lines += cuts
                if step == last:
                    break
    path = args.out / f"spectrum_dlrt_{args.experiment}_tau{args.tau:g}.txt"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
