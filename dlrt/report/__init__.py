"""dlrt-tables: the paper's tables and figures, ours beside the paper's numbers, from run folders."""
