"""What a run is made of, from its config: the device and the workers, the model, the optimizer, the scheduler,
the graphed step. The training loop (dlrt.experiments.train) takes these and knows nothing of how they were made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from dlrt import DLRTOptimizer, LowRankConv2d, low_rank_layers
from dlrt.graphs import CudaGraphs, GraphedStep

from .models import build_model, set_spectrum
from .schema import METHODS, RANK_ADAPTIVE


# --- workers -------------------------------------------------------------------------------------


@dataclass
class Workers:
    """This process's place in a data-parallel run (rank 0 of 1 when not under torchrun). Which examples are this
    worker's is decided by dlrt.experiments.data.sharding; `device` is where its collectives' tensors live (the
    GPU for nccl, the CPU for gloo)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def total(self, *values: float) -> list[float]:
        """Sums over the workers, in one collective (for losses and counts that each worker has for its own
        shard)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        """Leave the process group once every worker is done with it. A gloo group left to the interpreter's exit
        can abort a worker ("terminate called without an active exception") while a peer still tears down; called
        after a run ends well only (after an error a barrier could wait for a worker that is gone)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def init_workers(device: torch.device) -> Workers:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPUs, gloo on CPUs). torchrun's environment
    says where: RANK, WORLD_SIZE, LOCAL_RANK (the GPU of this process, devices.resolve_device), MASTER_ADDR and MASTER_PORT.
    On a GPU the process makes its GPU the current one, which nccl and DataLoader's pinned memory follow."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Workers(device=device)
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Workers(dist.get_rank(), dist.get_world_size(), device)


def configure_cpu(cfg: DictConfig) -> None:
    """torch's CPU threads, and whether subnormal floats are flushed to zero."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Subnormal floats (below 1.2e-38) take a slow path on x86 CPUs: once a dense FC net's training loss
    # neared 0, its epochs slowed from about 3 to 11 s. Flushing them changes only values below 1.2e-38.
    torch.set_flush_denormal(bool(cfg.flush_denormal))


def autocast(device: torch.device, precision: str):
    """bf16 autocast for forward and loss; the DLRT step (QR, SVD, truncation) always runs in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- model, optimizer, scheduler --------------------------------------------------------------


def make_model(cfg: DictConfig, input_shape, num_classes: int):
    options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in ("name", "rank")}
    rank = cfg.model.rank
    rank = list(rank) if OmegaConf.is_list(rank) else rank
    model = build_model(cfg.model.name, input_shape, num_classes, low_rank=cfg.method.name != "dense", rank=rank,
                        **options)
    if cfg.method.name == "vanilla_frozen_convs" and not next(model.parameters()).is_meta:
        freeze_convs_as_authors(model)
    return model


@torch.no_grad()
def freeze_convs_as_authors(model) -> None:
    """The published U V^T baseline (UV_vanilla/my_conv_vanilla.py): each low-rank conv's factors are built from
    √s of the sorted |N(0,1)| draws *before* the decay is applied, with requires_grad=False. So its convs are frozen
    random features at an undecayed spectrum, and only the linear layers' factors (and every bias) train."""
    convs = [layer for layer in low_rank_layers(model) if isinstance(layer, LowRankConv2d)]
    set_spectrum(model, "one", "authors", layers=convs)
    for layer in convs:
        for factor in (layer.U, layer.S, layer.V):
            factor.requires_grad_(False)


def optimizer_settings(cfg: DictConfig, method: str) -> dict:
    """DLRTOptimizer's arguments (all but the model) for one phase: `method` is cfg.method.name, or finetune.method
    for the fine-tuning phase. The method's and the update rule's keys are DLRTOptimizer's; those a group lacks take
    its defaults."""
    # plain strings, not the schema's enums: the optimizer's state_dict holds its settings, and a checkpoint must
    # load without the harness (torch.load's weights_only)
    settings = {key: value for group in (cfg.method, cfg.optim)
                for key, value in OmegaConf.to_container(group, resolve=True, enum_to_str=True).items() if key != "name"}
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    if method != cfg.method.name:
        settings["basis_every"] = 1  # a fine-tuning phase steps its bases at every batch
        if cfg.finetune.get("state_policy") is not None:
            settings["state_policy"] = str(cfg.finetune.state_policy)
    return dict(lr=cfg.lr, tau=cfg.tau, method=METHODS[method].steps_as if method in METHODS else method,
                optimizer=str(cfg.optim.name), svd_on=str(cfg.svd_on), **settings,
                checked_shortcuts=False if cfg.cuda_graphs else None)  # a graph cannot hold their host-side checks


def make_optimizer(cfg: DictConfig, model, method: str) -> DLRTOptimizer:
    return DLRTOptimizer(model, **optimizer_settings(cfg, method))


def make_scheduler(cfg: DictConfig, optimizer: DLRTOptimizer):
    """ReduceLROnPlateau on the validation loss, stepped once per epoch (the paper's ImageNet protocol)."""
    if cfg.scheduler.name == "none":
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.scheduler.factor, patience=cfg.scheduler.patience)


def make_graphed_step(cfg: DictConfig, model, optimizer: DLRTOptimizer) -> GraphedStep | None:
    """The CUDA-graphed training step when cuda_graphs=true and the optimizer's method can be graphed (a fixed
    fine-tuning phase runs eagerly)."""
    if not cfg.cuda_graphs or optimizer.method == "fixed":
        return None
    # a capture that fails (an operation this torch cannot capture) must not end the run: eager from there on
    return GraphedStep(model, optimizer, F.cross_entropy, graphs=CudaGraphs(), on_failure="eager")


def phases(cfg: DictConfig) -> list[tuple[str, str, int]]:
    """(phase, method, epochs) of the run: the training phase, and the fine-tuning phase where there is one."""
    method = cfg.method.name
    finetune = cfg.finetune.epochs if method in RANK_ADAPTIVE else 0
    return [("train", method, cfg.epochs)] + ([("finetune", str(cfg.finetune.method), finetune)] if finetune else [])
