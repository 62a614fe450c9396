"""The steps suite before (592d082) and after (50a0a34) the thin optimizer, alternating, same hour: CPU time per
training step over dense's in the same run (cpu_ratio_to_dense), and their ratio new/old."""
import pandas as pd

runs = [f"{side}{n}" for n in (1, 2, 3) for side in ("old", "new")]
frames = [pd.read_csv(f"steps_{run}.csv").assign(run=run) for run in runs]
steps = pd.concat(frames).query("phase == 'train'")
table = steps.pivot_table(index=["case", "method"], columns="run", values="cpu_ratio_to_dense")[runs]
table["old"] = table[[r for r in runs if r.startswith("old")]].median(axis=1)
table["new"] = table[[r for r in runs if r.startswith("new")]].median(axis=1)
table["new/old"] = table["new"] / table["old"]
pd.set_option("display.width", 200)
print(__doc__)
print(table.round(3).to_string())
print("\nother processes' CPU share while timed (mean %):", steps.groupby("run").others_cpu_pct.mean().round(0).to_dict())
