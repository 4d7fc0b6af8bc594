"""What a run shows: the tables train.py prints, and its curves.

The numbers come from the stages (report.json); this file only lays them out.
"""
import json
import logging
from pathlib import Path

from .records import RATINGS

log = logging.getLogger("rmlab.train").info


def print_reward_table(rows, kinds, kl_coef):
    cols = [f"R_{k}" for k in kinds] + ["R_c", "R_white", "kl_sum", "reward_sum"]
    log(f"\nKL-shaped reward of sampled responses (R = WHITEN(R_c) at the last token − {kl_coef}·Σ KL_t)")
    log(f"{'prompt':<34} {'response':<34} {'eos':>3} " + " ".join(f"{c:>9}" for c in cols))
    short = lambda s: (s.replace("\n", " ")[-32:]).ljust(34)
    for r in rows:
        log(f"{short(r['prompt'])} {short(r['response'])} {'y' if r['hit_eos'] else 'n':>3} "
            + " ".join(f"{r[c]:>9.3f}" for c in cols))


def print_report(report):
    if (report.get("lengths") or {}).get("warning"):        # said at the top of the run, and again here
        log(f"\nWARNING: {report['lengths']['warning']}")
    models = report.get("rm", {})
    cell = lambda d, k: f"{d[k]['accuracy']:.3f}" if k in d else "-"
    if models:
        log("\nReward models on held-out test pairs (accuracy, ties apart; ratings as Llama 2's Table 8)")
        log(f"{'model':<9} {'n':>5} {'overall':>8} {'ties':>6} " + " ".join(f"{c[:12]:>12}" for c in RATINGS)
            + f" {'helpful':>8} {'safety':>8} {'len-base':>8}")
    for kind, m in models.items():
        t = m["test"]
        log(f"{kind:<9} {t['n']:>5} {t['accuracy']:>8.3f} {t['ties']:>6.3f} "
            + " ".join(f"{cell(t['per_rating'], c):>12}" for c in RATINGS)
            + f" {cell(t['by_kind'], 'helpful'):>8} {cell(t['by_kind'], 'safety'):>8}"
            + f" {m['length_baseline_test']['accuracy']:>8.3f}")
    for kind, m in models.items():
        t, lb = m["test"], m["length_baseline_test"]
        log(f"{kind:<9} 95% CI {t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}; length baseline "
            f"(ties {lb['ties']:.3f}): " + ", ".join(f"{k} {v['accuracy']:.3f}"
                                                     for k, v in lb["by_kind"].items()))
    cats = sorted({c for m in models.values() for c in m["test"]["per_category"]})
    for kind, m in models.items() if cats else []:
        log(f"{kind:<9} per category: " + ", ".join(f"{c} {cell(m['test']['per_category'], c)}"
                                                     for c in cats))
    if report.get("reward"):
        r = report["reward"]
        log(f"\nKL-shaped reward of --policy (default π₀) over {r['n']} samples: mean KL "
            f"{r['mean_kl_sum']:.4f} (β = {r['kl_coef']}), mean R_c {r['mean_R_c']:.3f}, "
            f"mean Σ reward {r['mean_reward_sum']:.3f}")
    if report.get("ppo"):
        a, b = report["ppo"]["start"], report["ppo"]["final"]
        log(f"\nPPO, {report['ppo']['iters']} iterations, on held-out prompts, π₀ → π_θ: proxy "
            f"{a['eval_proxy']:.3f} → {b['eval_proxy']:.3f}, KL {a['eval_kl']:.3f} → {b['eval_kl']:.3f} "
            f"nats, KL-shaped reward {a['eval_reward']:.3f} → {b['eval_reward']:.3f}")
        if "win_rate_vs_pi0" in b:
            log(f"oracle {a['eval_oracle']:.3f} → {b['eval_oracle']:.3f}; oracle win-rate of π_θ over "
                f"π₀ {b['win_rate_vs_pi0']:.3f} ± {b['win_rate_ci95']:.3f} (95% CI)")
    # A reused stage's time is the earlier run's; a resumed one's counts from the resume.
    said = {"reuse": " (reused)", "resume": " (since the resume)"}
    log("Stage wall time (s): " + ", ".join(f"{k} {v}{said.get(report['mode'].get(k), '')}"
                                             for k, v in report["seconds"].items() if k != "total")
        + f"; this run {report['seconds']['total']}")


def plot(metrics_path, png, x, ys, rank, title):
    """ys against x from metrics.jsonl, one panel each, when matplotlib is installed; a loss that
    spans a decade (π₀'s) on a log scale."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()] if rank == 0 else []
    ys = [y for y in ys if any(y in r for r in rows)]
    if not ys:
        return
    fig, axes = plt.subplots(1, len(ys), figsize=(4.5 * len(ys), 3.2), squeeze=False)
    for ax, y in zip(axes[0], ys):
        values = [r[y] for r in rows if y in r]
        ax.plot([r[x] for r in rows if y in r], values, "o-" if x == "iter" else "-")
        ax.set(xlabel=x, ylabel=y)
        if y == "loss" and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    log(f"plot: {png}")
