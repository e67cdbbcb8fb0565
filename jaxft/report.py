"""The end-of-run report: loss_curve.png (train and eval) and report.html beside metrics.jsonl."""

from __future__ import annotations

import html
import json
import os


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    train_rows, eval_rows = [], []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            row = json.loads(line)
            (train_rows if "loss" in row else eval_rows if "eval_loss" in row else []).append(row)
    return train_rows, eval_rows


def plot_losses(workdir: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train_rows, eval_rows = read_metrics(workdir)
    if not train_rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss", lw=1.2)
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval loss", lw=1.5)
        for key in sorted({k for r in eval_rows for k in r if k.startswith("eval_loss/")}):  # named validation sources
            steps = [r["step"] for r in eval_rows if key in r]
            ax.plot(steps, [r[key] for r in eval_rows if key in r], ".--", label=key.replace("eval_", "eval "), lw=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "loss_curve.png")
    fig.savefig(path)
    plt.close(fig)
    if any("reward" in r for r in train_rows):  # online RL (task=grpo): the reward is the curve to read
        fig, ax = plt.subplots(figsize=(7, 3), dpi=110)
        ax.plot([r["step"] for r in train_rows if "reward" in r], [r["reward"] for r in train_rows if "reward" in r],
                label="mean reward of the step's rollouts", lw=1.2)
        if any("eval_reward" in r for r in eval_rows):
            ax.plot([r["step"] for r in eval_rows if "eval_reward" in r],
                    [r["eval_reward"] for r in eval_rows if "eval_reward" in r], "o-", label="eval reward", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "reward_curve.png"))
        plt.close(fig)
    return path


def write_report(workdir: str, summary: dict) -> str:
    """report.json (the summary) and report.html (summary, curve, task eval before/after, samples)."""
    plot = plot_losses(workdir)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    train_rows, eval_rows = read_metrics(workdir)
    e = html.escape
    rows = [("steps", summary.get("step")), ("resumed from step", summary.get("resumed_from") or "-"),
            ("first / last train loss", f"{train_rows[0]['loss']:.4f} / {train_rows[-1]['loss']:.4f}" if train_rows else "-"),
            ("final eval loss", f"{eval_rows[-1]['eval_loss']:.4f}" if eval_rows else "-"),
            *([("final accuracy / macro-F1", f"{eval_rows[-1]['accuracy']:.1%} / {eval_rows[-1]['f1']:.3f}")]
              if eval_rows and "f1" in eval_rows[-1] else []),  # task=classification
            *([("final " + key, f"{eval_rows[-1][key]:.1%}") for key in ("accuracy", "eval_rewards/accuracies")
               if eval_rows and key in eval_rows[-1] and "f1" not in eval_rows[-1]]),  # task=reward, task=dpo
            ("wall time", f"{summary.get('seconds', 0):.1f} s"), ("model", summary.get("model", "-"))]
    parts = ["<!doctype html><meta charset='utf-8'><title>jaxft report</title>",
             "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}td,th{padding:4px 10px;"
             "border-bottom:1px solid #ddd;text-align:left}.ok{color:#070}.bad{color:#a00}</style>",
             f"<h1>jaxft run: {e(os.path.basename(os.path.abspath(workdir)))}</h1><table>"]
    parts += [f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows]
    parts.append("</table>")
    if plot:
        parts.append("<h2>Loss</h2><img src='loss_curve.png' alt='loss curve' width='700'>")
    if os.path.exists(os.path.join(workdir, "reward_curve.png")):
        parts.append("<h2>Reward</h2><img src='reward_curve.png' alt='reward curve' width='700'>")
    task = summary.get("task")
    if task:
        before, after = task.get("before"), task.get("after")  # "after" is absent when a run stopped early
        parts.append("<h2>Task evaluation</h2><table><tr><th></th><th>exact match</th><th>contains</th></tr>")
        for name, result in (("before training", before), ("after training", after)):
            if result:
                parts.append(f"<tr><th>{name}</th><td>{result['exact_match']:.1%}</td><td>{result['contains']:.1%}</td></tr>")
        parts.append("</table><h2>Samples</h2><table><tr><th>prompt</th><th>answer</th><th>before</th><th>after</th></tr>")
        before_samples = {s["prompt"]: s["output"] for s in (before or {}).get("samples", [])}
        for sample in (after or before)["samples"]:
            ok = "ok" if sample["output"] == sample["answer"] else "bad"
            after_output = sample["output"] if after else ""
            parts.append(f"<tr><td>{e(sample['prompt'])}</td><td>{e(sample['answer'])}</td>"
                         f"<td>{e(before_samples.get(sample['prompt'], ''))}</td><td class='{ok}'>{e(after_output)}</td></tr>")
        parts.append("</table>")
    parts += _eval_before_after(summary.get("eval_before"), summary.get("eval"))
    parts += _examples(summary.get("examples") or {})
    parts += _lm_eval(summary.get("lm_eval") or [])
    path = os.path.join(workdir, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def _eval_before_after(before: dict | None, after: dict | None) -> list[str]:
    """The task's eval metrics before (eval.at_start) and after training, side by side."""
    if not before:
        return []
    e = html.escape
    parts = ["<h2>Evaluation before / after training</h2><table><tr><th>metric</th><th>before</th><th>after</th></tr>"]
    for key, value in before.items():
        later = (after or {}).get(key)
        parts.append(f"<tr><th>{e(key)}</th><td>{value:.4f}</td><td>{'' if later is None else f'{later:.4f}'}</td></tr>")
    return parts + ["</table>"]


def _lm_eval(rows: list[dict]) -> list[str]:
    """`jaxft eval --lm-eval` on this run: one row per task and metric (jaxft.harness.summary_table)."""
    if not rows:
        return []
    e = html.escape
    parts = ["<h2>lm-evaluation-harness</h2><table><tr><th>task</th><th>metric</th><th>filter</th><th>value</th>"
             "<th>stderr</th><th>examples</th></tr>"]
    for r in rows:
        stderr = "" if r.get("stderr") is None else f"{r['stderr']:.4f}"
        parts.append(f"<tr><td>{e(r['task'])}</td><td>{e(r['metric'])}</td><td>{e(r['filter'])}</td>"
                     f"<td>{r['value']:.4f}</td><td>{stderr}</td><td>{e(str(r.get('samples') or ''))}</td></tr>")
    return parts + ["</table>"]


def _examples(examples: dict) -> list[str]:
    """The task's examples (Task.examples), before and after training: one row each, the numbers
    of both runs side by side."""
    rows_before, rows_after = examples.get("before") or [], examples.get("after") or []
    rows = rows_after or rows_before
    if not rows:
        return []
    e = html.escape
    texts = [k for k, v in rows[0].items() if isinstance(v, str)]
    numbers = [k for k, v in rows[0].items() if not isinstance(v, str)]
    header = "".join(f"<th>{e(k)}</th>" for k in texts)
    header += "".join(f"<th>{e(k)} before</th><th>{e(k)} after</th>" for k in numbers)
    parts = [f"<h2>Examples</h2><table><tr>{header}</tr>"]
    for i, row in enumerate(rows):
        before = rows_before[i] if i < len(rows_before) else {}
        after = rows_after[i] if i < len(rows_after) else {}
        cells = "".join(f"<td>{e(row[k])}</td>" for k in texts)
        for k in numbers:
            cells += "".join(f"<td>{'' if k not in side else f'{side[k]:.3f}'}</td>" for side in (before, after))
        parts.append(f"<tr>{cells}</tr>")
    return parts + ["</table>"]
