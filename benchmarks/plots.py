"""PNG plots of a ``run_preset`` result: time and peak memory against sequence length and prefix length,
one line per provider, one column per mode. Needs matplotlib (``pip install ptv2-fast[bench]``)."""

from __future__ import annotations

import os


def _series(result: dict, series: str):
    runs = [r for r in result["runs"] if r["series"] == series]
    axis = "P" if series == "prefix" else ("S" if runs and runs[0]["shape"]["L"] == 1 else "L")
    return axis, sorted(runs, key=lambda r: r["shape"][axis])


def plot_preset(result: dict, out_dir: str, stem: str | None = None) -> list[str]:
    """Write ``<stem>_vs_<axis>.png`` for each swept axis; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    stem = stem or f"bench_{result['preset']}"
    env = result["environment"]
    paths = []
    for series in ("seq", "prefix"):
        axis, runs = _series(result, series)
        if len(runs) < 2:
            continue
        modes = result["modes"]
        fig, axes = plt.subplots(2, len(modes), figsize=(5.5 * len(modes), 7.5), squeeze=False)
        providers = list(dict.fromkeys(row["provider"] for r in runs for row in r["results"]))
        for col, mode in enumerate(modes):
            for metric, row_ax, label in (("ms", axes[0][col], "time (ms)"),
                                          ("peak_mem_mb", axes[1][col], "peak memory (MiB)")):
                for prov in providers:
                    xs, ys = [], []
                    for r in runs:
                        hit = [x for x in r["results"] if x["provider"] == prov and x["mode"] == mode]
                        if hit and hit[0].get(metric) is not None:
                            xs.append(r["shape"][axis])
                            ys.append(hit[0][metric])
                    if xs:
                        style = "-o" if prov.startswith("ptv2_fast") else "--."
                        row_ax.plot(xs, ys, style, label=prov, linewidth=2.2 if style == "-o" else 1.2)
                row_ax.set_xlabel({"L": "sequence length L = S", "S": "cache length S", "P": "prefix length P"}[axis])
                row_ax.set_ylabel(label)
                row_ax.set_title(f"{mode}")
                row_ax.grid(alpha=0.3)
                row_ax.set_xscale("log", base=2)
                if metric == "ms":
                    row_ax.set_yscale("log")
        axes[0][0].legend(fontsize=8)
        base = runs[0]["shape"]
        fixed = ", ".join(f"{k}={base[k]}" for k in ("B", "Hq", "Hkv", "L", "S", "P", "T", "D")
                          if k != axis and not (axis == "L" and k == "S"))
        fig.suptitle(f"ptv2-fast bench {result['preset']} ({result['dtype']}): {fixed}\n"
                     f"{env['device']} | torch {env['torch']} | {env['date'][:10]}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_vs_{axis}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
