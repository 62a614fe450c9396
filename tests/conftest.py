import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py

# One thread: MKL's LAPACK with two threads on a two-core machine stalls badly whenever another process
# is busy (a 500x500 SVD: 0.03 s alone, 6.7 s beside one busy process), and the tests gain little from two.
torch.set_num_threads(1)
