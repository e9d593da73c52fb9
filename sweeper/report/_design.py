"""A designed experiment's report: Yosinski et al.'s figure and table (``design=yosinski``).

``python -m sweeper.report design=NAME`` gathers the trials of the latest run of the design
(``conf/experiment/<name>.yaml``; its treatments in ``conf/treatment/``) across MLflow
experiments, and draws test accuracy on B against n, the units transferred, per treatment.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from sweeper.errors import UserError
from sweeper.tracking import Param, State, Tag, Tracker

TREATMENTS = ("AnB", "AnB+", "BnB", "BnB+")


def design_frame(tracker: Tracker, design: str) -> pd.DataFrame:
    """The trials of the latest run of experiment design ``design``, across MLflow experiments."""
    client = tracker.client
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, f"params.`{Param.DESIGN}` = '{design}'", max_results=50000,
                              order_by=["start_time DESC"])
    if not runs:
        raise UserError(f"No trials of experiment design {design!r} in {tracker.uri}. Run it: "
                        f"python -m sweeper.run -m experiment={design}")
    latest = runs[0].data.params.get(Param.DESIGN_SWEEP)
    rows = [{"treatment": r.data.params[Param.TREATMENT],
             "n": int(r.data.params[Param.TRANSFERRED]),
             "seed": int(r.data.params[Param.SEED]),
             "test_acc": r.data.metrics.get("test_acc", math.nan),
             "val_acc": r.data.metrics.get("val_acc", math.nan),
             "state": r.data.tags.get(Tag.STATE, ""),
             "pretrain_run_id": r.data.tags.get(Tag.PRETRAIN_RUN_ID)}
            for r in runs if r.data.params.get(Param.DESIGN_SWEEP) == latest]
    return pd.DataFrame(rows)


def make_design_report(cfg: DictConfig, design: str) -> tuple[pd.DataFrame, Path]:
    """Yosinski et al.'s figure: accuracy on B against n for AnB, AnB+, BnB, BnB+ (mean, std
    over seeds), with the base B model's accuracy as a reference line; plus its table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracker = Tracker(cfg.tracking)
    trials = design_frame(tracker, design)
    done = trials[trials.state == State.COMPLETE]
    table = done.pivot_table(index="n", columns="treatment", values="test_acc",
                             aggfunc=["mean", "std", "count"])
    base_ids = done[done.treatment.str.startswith("BnB")].pretrain_run_id.dropna().unique()
    base_b = [tracker.client.get_run(i).data.metrics.get("test_acc") for i in base_ids]
    base_b = [b for b in base_b if b is not None]
    folder = Path(cfg.paths.experiments) / design / "report"
    folder.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"AnB": ("tab:red", "o", "-"), "AnB+": ("tab:red", "s", "--"),
              "BnB": ("tab:blue", "o", "-"), "BnB+": ("tab:blue", "s", "--")}
    for t in TREATMENTS:
        sub = done[done.treatment == t]
        if sub.empty:
            continue
        colour, marker, line = styles[t]
        agg = sub.groupby("n").test_acc.agg(["mean", "std"])
        ax.errorbar(agg.index, agg["mean"], yerr=agg["std"].fillna(0), color=colour,
                    marker=marker, linestyle=line, capsize=3, label=t)
        ax.scatter(sub.n, sub.test_acc, color=colour, s=8, alpha=0.3)
    if base_b:
        ax.axhline(sum(base_b) / len(base_b), color="k", linestyle=":",
                   label="base B (trained on B)")
    ax.set(xlabel="n: units transferred from the pretrained model",
           ylabel="test accuracy on B", title=f"Transferability of features ({design})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "transfer.png", dpi=120)
    plt.close(fig)

    lines = [f"# Experiment {design}", "",
             f"{len(done)} complete trials of {len(trials)}; test accuracy on B, mean ± std over "
             f"seeds. Base B (the model pretrained on B, evaluated on B's test set): "
             + (f"{sum(base_b) / len(base_b):.3f}." if base_b else "not found."), "",
             "| n | " + " | ".join(TREATMENTS) + " |", "|---" * (len(TREATMENTS) + 1) + "|"]
    for n in sorted(done.n.unique()):
        cells = []
        for t in TREATMENTS:
            try:
                m, sd = table.loc[n, ("mean", t)], table.loc[n, ("std", t)]
                cells.append(f"{m:.3f} ± {0 if math.isnan(sd) else sd:.3f}")
            except KeyError:
                cells.append("–")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy on B against n](transfer.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    print("\n".join(lines[:-2]))
    print(f"Report: {folder / 'report.md'}")
    return table, folder
