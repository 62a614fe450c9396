"""dlrt-bench: times DLRT's training steps and inference against dense training of the same net, and measures their
memory, in one process. docs/performance.md says what each suite measures and how, and what was found.

    dlrt-bench                                # the default suites, default sizes, into bench_out/
    python -m dlrt.bench --suite steps --device cuda
    python -m dlrt.bench --quick --out /tmp/b # seconds: tiny sizes, for tests

Suites, a module each: steps, timing_study, breakdown, linalg and memory run by default; profile, torchvision and
throughput only when named. `cases` says what is timed, `timing` how, `output` what is written, `cli` the command
line.
"""
