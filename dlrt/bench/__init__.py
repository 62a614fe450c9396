"""dlrt-bench: time DLRT training steps and inference against dense training, in one process.

    dlrt-bench                                # every suite, default sizes, into bench_out/ (--out results/bench: the committed files)
    python -m dlrt.bench --suite steps --device cuda
    python -m dlrt.bench --quick --out /tmp/b # seconds: tiny sizes, for tests

Suites, one module each: ``steps`` (a training step and an inference pass of every method against dense, at the
paper's ranks), ``timing_study`` (PAPER.md §3's study over ranks, and where each method stops being faster than
dense), ``breakdown`` (where a step's time goes, from the torch.profiler labels of dlrt.functional.PARTS) and
``linalg`` (linalg_suite: one step's QR and SVD calls at the real shapes against alternatives). `cases` says what is
timed (the cases and their runners), `timing` how, `output` what is written, `cli` the command line.

How it times. Synthetic random batches already on the device (no data loading), 64 distinct ones per case, cycled,
so that no model memorises them (a memorised batch drives the gradients subnormal, which x86 CPUs process very
slowly); subnormals are also flushed to zero while timing (--no-flush-denormal to keep them). A training step is
zero_grad + forward + cross-entropy + backward + opt.step (for ``fixed`` opt.step(closure) alone, which calls the
closure twice). Inference is one forward of the eval batch under torch.no_grad. Each runner first takes `--warmup`
untimed steps; then the runners of a case take turns in rounds (so load that comes and goes on a shared machine
hits all of them alike) and every step is timed on its own, with torch.cuda.synchronize() before and after on CUDA.
Reported: median (and quartiles) of the timed steps and the ratio of medians to dense, in wall time and in this
process's CPU time (cpu_ms: with --threads 1 the work itself, robust to other processes taking turns on the cores).

Ranks. ``adaptive`` and ``parallel`` run honestly at the case's ϑ from the stated starting ranks, and may move their
ranks on random data: the CSV has the ranks at the start and the end of timing and whether they ever changed.
``adaptive_pinned`` is the same step with r_min = r_max = the starting ranks per layer (it does the whole
truncation, then the clamp keeps the rank): the cost of the step exactly at the stated ranks.

The machine. On a shared CPU other processes steal time: each row records `others_cpu_pct`, the share of all cores
that other processes used while it was timed (from /proc/stat), and the load average. `--wait-idle SECONDS` waits
(up to that long) for a quiet machine before each case.

A method whose step raises (e.g. an SVD that fails to converge) is reported with its error in the CSV's `error`
column and left out; the other methods' results are kept. Every suite writes <suite>.csv and <suite>.txt (the
printed table) to --out, atomically; timing_study also a plot.
"""
