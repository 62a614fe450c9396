"""The harness that reproduces the paper with dlrt: the dlrt-run Hydra app (its configs are configs/ at the top of the repository, carried in the wheel), the paper's
recipes and numbers (protocols), models and data sets, the training loop, run folders and dlrt-export. It imports
the method (dlrt); the method never imports it."""
