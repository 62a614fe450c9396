"""Peak step memory of the code before issue 18 (8164c64), as dlrt-bench --suite memory measures it: the timing-study
net at ranks 80 and 640 and LeNet5 (output: memory_before.txt).

How it ran: `PYTHONPATH=<a checkout of 8164c64> python memory_before.py`, with step_memory.py beside it: a copy of
dlrt/bench/memory.py of 62aacc0 (torch only) whose state_storages also counts the old optimizer's `layer_states`
as optimizer state. The old optimizer had no closure support for one-pass methods, so those step as zero_grad,
backward, step."""
import math, os, sys, torch, torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_memory import peak_step_memory, PARTS
from dlrt import DLRTOptimizer
from dlrt.models import build_model  # dlrt.experiments.models from 98bbaab on
torch.set_num_threads(1)
MIB = 2 ** 20
cases = [("timing_study_r80", "fc", {"width": 5120}, (1, 28, 28), 500, 80, ("dense", "adaptive", "fixed", "parallel")),
         ("timing_study_r640", "fc", {"width": 5120}, (1, 28, 28), 500, 640, ("dense", "adaptive", "fixed", "parallel")),
         ("lenet5_t0.15", "lenet5", {}, (1, 28, 28), 128, [9, 16, 28], ("dense", "adaptive"))]
for name, model_name, options, shape, batch, rank, methods in cases:
    for optimizer in ("sgd", "adam"):
        dense_peak = math.nan
        for method in methods:
            torch.manual_seed(0)
            low = method != "dense"
            model = build_model(model_name, shape, 10, low_rank=low, rank=rank, init="authors" if low else "svd", **options)
            if low:
                opt = DLRTOptimizer(model, lr=1e-3, tau=0.0, method=method, optimizer=optimizer)
                opt._r_min, opt._r_max = list(opt.ranks()), list(opt.ranks())
            else:
                opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(1)
            x = torch.rand((batch, *shape), generator=g); y = torch.randint(10, (batch,), generator=g)
            def closure():
                opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); return loss
            step = (lambda: opt.step(closure)) if method == "fixed" else (lambda: (closure(), opt.step()))
            m = peak_step_memory(step, model, opt, warmup=2)
            if method == "dense":
                dense_peak = m.peak / MIB
            top = "; ".join(f"{op} {size / MIB:.1f}" for op, size in m.top_temporaries[:4])
            print(f"before {name} {method} {optimizer}: peak {m.peak / MIB:.1f} MiB ({100 * m.peak / MIB / dense_peak:.1f} % of dense); "
                  + ", ".join(f"{p} {m.parts[p] / MIB:.1f}" for p in PARTS) + f"; top temporaries: {top}", flush=True)
            del model, opt
