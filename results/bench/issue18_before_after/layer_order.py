"""The memory suite's cases one at a time (python layer_order.py CASE OPTIMIZERS, e.g. vgg16_imagenet adam,sgd): the
adaptive step's peak memory, to compare the order of the layer-by-layer step (output: layer_order.txt)."""
import sys

import torch

from dlrt.bench.memory_suite import memory_cases, memory_rows

torch.set_num_threads(1)
case = [c for c in memory_cases(torch.device("cpu"), False) if c.name == sys.argv[1]][0]
for optimizer in sys.argv[2].split(","):
    r = memory_rows(case, "adaptive", optimizer, torch.device("cpu"), {})
    print(f"{case.name} adaptive {optimizer}: peak {r['peak_mib']:.1f} MiB; params {r['parameters_mib']:.1f} grads "
          f"{r['gradients_mib']:.1f} state {r['optimizer_state_mib']:.1f} saved {r['saved_for_backward_mib']:.1f} "
          f"temps {r['temporaries_mib']:.1f}; {r['top_temporaries']}", flush=True)
