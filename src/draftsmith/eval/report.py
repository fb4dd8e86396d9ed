"""`report.md` and its PNG plots from a metrics dict (`eval.metrics.build_metrics` + run info).

Plots (matplotlib, Agg backend, written next to report.md):
- `tau_per_dataset.png`: τ per dataset and overall, one bar per drafter (plain is the line τ = 1);
- `acceptance_by_position.png`: conditional acceptance P[k accepted | k-1 accepted] and survival
  P[accepted >= k] by draft position, pooled over all datasets;
- `tokens_per_s.png`: tokens/s per dataset and overall for every decoder, plain included, with
  the overall speedup written on each decoder's bar.
"""

from __future__ import annotations

import math
from pathlib import Path

from draftsmith.utils.io import atomic_write_text
from draftsmith.utils.plots import pyplot, save

PLOTS = {
    "tau": "tau_per_dataset.png",
    "acceptance": "acceptance_by_position.png",
    "speed": "tokens_per_s.png",
}


def fmt_num(value, fmt: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def _pct(value) -> str:
    return fmt_num(None if value is None else 100 * value, "{:.0f} %")


def comparison_table(metrics: dict) -> list[str]:
    """One row per decoder (plain and baselines included)."""
    drafts = metrics["drafts"]
    datasets = list(next(iter(drafts.values()))["datasets"])
    head = (["decoder"] + [f"τ {ds}" for ds in datasets]
            + ["τ overall [95 % CI]", "τ w/o capped", "τ llama.cpp", "capped", "tok/s", "speedup",
               "decode tok/s", "decode speedup", "mismatches"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in drafts.items():
        o = entry["overall"]
        row = [f"**{name}**"] + [fmt_num(entry["datasets"][ds]["tau"]) for ds in datasets]
        row += [_with_ci(o["tau"], o.get("tau_ci")), fmt_num(o["tau_uncapped"]), fmt_num(o["tau_llama_cpp"]), _pct(o["capped_share"]),
                fmt_num(o["tokens_per_s"], "{:.1f}"), fmt_num(o["speedup"], "{:.2f}×"),
                fmt_num(o["decode_tokens_per_s"], "{:.1f}"), fmt_num(o["decode_speedup"], "{:.2f}×"),
                "–" if o["mismatches"] is None else f"{o['mismatches']}/{o['compared']}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _with_ci(value, ci) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return fmt_num(value)
    return f"{fmt_num(value)} [{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


def comparison_lines(metrics: dict) -> list[str]:
    """τ of each draft over each later one, with the paired bootstrap interval."""
    lines = []
    for c in metrics.get("comparisons", []):
        lo, hi = c["ci"]
        ratio = c["tau_ratio"]
        if ratio is None:
            continue
        lines.append(f"τ {c['first']} / τ {c['second']} = {ratio:.3f} (95 % paired bootstrap over "
                     f"{c['records']} records: {fmt_num(lo, '{:.3f}')}–{fmt_num(hi, '{:.3f}')})")
    return lines


def round_table(metrics: dict) -> list[str]:
    """Per decoder: what a round costs and how much of the draft survives."""
    head = ["decoder", "rounds", "mean draft len", "acceptance rate", "draft ms/round",
            "verify ms/round", "verify rate (tok/s)", "empty rounds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in metrics["drafts"].items():
        o = entry["overall"]
        lines.append("| " + " | ".join([
            name, str(o["rounds"]), fmt_num(o["mean_draft_len"]), _pct(o["acceptance_rate"]),
            fmt_num(o["draft_ms_per_round"], "{:.1f}"), fmt_num(o["verify_ms_per_round"], "{:.1f}"),
            fmt_num(o["verify_rate"], "{:.0f}"), str(o["empty_rounds"])]) + " |")
    return lines


def _mismatch_lines(metrics: dict) -> list[str]:
    lines = []
    for name, entry in metrics["drafts"].items():
        for ds, m in entry["datasets"].items():
            for d in m.get("mismatch_details") or []:
                gap = fmt_num(d.get("top2_gap"), "{:.3g}")
                lines.append(f"- {name} / {ds}: record {d.get('record')} turn {d.get('turn')}: first "
                             f"difference at generated token {d['position']}, target top-2 logit gap {gap}")
    return lines


def render_markdown(metrics: dict, plots: dict[str, str]) -> str:
    info = metrics.get("config", {})
    lines = ["# draftsmith eval", ""]
    if info:
        lines += [f"Target `{info.get('target')}` ({info.get('dtype')}), datasets "
                  f"{', '.join(info.get('datasets', {}))}, temperature {info.get('temperature')}, "
                  f"max new tokens {info.get('max_new_tokens')}, max samples {info.get('max_samples')}, "
                  f"batch size {info.get('batch_size')}, seed {info.get('seed')}, "
                  f"{info.get('threads')} threads, wall time {fmt_num(metrics.get('wall_s'), '{:.0f}')} s.", ""]
    lines += ["## Comparison", ""] + comparison_table(metrics) + [""]
    if metrics.get("comparisons"):
        lines += comparison_lines(metrics) + [""]
    lines += [
        "τ counts the bonus token (accepted + 1 per round; an EOS-terminated round counts only what "
        "it accepted), pooled over every round of every answer. *τ w/o capped* leaves out answers cut "
        "at max-new-tokens (*capped*: their share); *τ llama.cpp* = 1 + accepted / rounds with a "
        "non-empty draft, the served `mean len`. *tok/s* = generated tokens / (prefill + decode) "
        "wall time, *decode tok/s* leaves prefill out; speedups divide by plain decoding of the same "
        "target on the same prompts in the same process, interleaved per prompt. *mismatches*: "
        "answers that differ from plain decoding's at T = 0 (answers compared).", ""]
    lines += ["## Rounds", ""] + round_table(metrics) + [""]
    mism = _mismatch_lines(metrics)
    if mism:
        lines += ["## Mismatches with plain decoding", "",
                  "float32 multi-token verification is not bitwise equal to one-token decoding: "
                  "a small top-2 gap at the first difference marks a near-tie.", ""] + mism + [""]
    lines += ["## Plots", ""]
    titles = {"tau": "τ per dataset", "acceptance": "acceptance by draft position", "speed": "tokens/s"}
    for key, file in plots.items():
        lines += [f"![{titles[key]}]({file})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _drafters(metrics: dict) -> list[str]:
    """Decoders that draft (plain decoding is the τ = 1 line, not a series)."""
    kinds = {n: d.get("kind") for n, d in metrics.get("config", {}).get("decoders", {}).items()}
    return [n for n in metrics["drafts"] if kinds.get(n, n) != "plain"]


def _colors(metrics: dict) -> dict[str, str]:
    """One color per decoder, the same in every plot (plain in gray)."""
    out = {n: "0.55" for n in metrics["drafts"]}
    out.update({n: f"C{k % 10}" for k, n in enumerate(_drafters(metrics))})
    return out


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], colors: list[str]) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, values) in enumerate(series.items()):
        xs = [g + (k - (n - 1) / 2) * width for g in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, ys, width, label=name, color=colors[k])
        for bar, v in zip(bars, values):
            ax.annotate(fmt_num(v, "{:.2f}" if max(ys + [0]) < 10 else "{:.0f}"),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8)


def _plot_tau(plt, metrics: dict, path: Path) -> None:
    names = _drafters(metrics)
    datasets = list(next(iter(metrics["drafts"].values()))["datasets"])
    groups = datasets + ["overall"]
    series = {n: [metrics["drafts"][n]["datasets"][ds]["tau"] for ds in datasets]
              + [metrics["drafts"][n]["overall"]["tau"]] for n in names}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4))
    _grouped_bars(ax, groups, series, [_colors(metrics)[n] for n in names])
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="plain (τ = 1)")
    ax.set_ylabel("τ (accepted + bonus per round)")
    ax.set_title("τ per dataset")
    save(fig, path)


def _plot_acceptance(plt, metrics: dict, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = _colors(metrics)
    for name in _drafters(metrics):
        o = metrics["drafts"][name]["overall"]
        for ax, key in ((left, "conditional_acceptance"), (right, "survival")):
            values = [v if v is not None else float("nan") for v in o[key]]
            ax.plot(range(1, len(values) + 1), values, marker="o", label=name, color=colors[name])
    left.set_title("conditional acceptance P[k accepted | k−1 accepted]")
    right.set_title("survival P[accepted ≥ k]")
    for ax in (left, right):
        ax.set_xlabel("draft position k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path)


def _plot_speed(plt, metrics: dict, path: Path) -> None:
    drafts = metrics["drafts"]
    datasets = list(next(iter(drafts.values()))["datasets"])
    groups = datasets + ["overall"]
    series = {f"{n} ({fmt_num(e['overall']['speedup'], '{:.2f}×')})":
              [e["datasets"][ds]["tokens_per_s"] for ds in datasets] + [e["overall"]["tokens_per_s"]]
              for n, e in drafts.items()}
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups) + 2), 4))
    _grouped_bars(ax, groups, series, [_colors(metrics)[n] for n in drafts])
    ax.set_ylabel("generated tokens / s (prefill included)")
    ax.set_title("tokens/s (legend: overall speedup over plain)")
    save(fig, path)


def write_plots(metrics: dict, out_dir: Path) -> dict[str, str]:
    """Write the PNGs into out_dir -> {plot key: file name}."""
    plt = pyplot()

    _plot_tau(plt, metrics, out_dir / PLOTS["tau"])
    _plot_acceptance(plt, metrics, out_dir / PLOTS["acceptance"])
    _plot_speed(plt, metrics, out_dir / PLOTS["speed"])
    return dict(PLOTS)


def write_report(metrics: dict, out_dir: str | Path) -> Path:
    """report.md + PNGs in out_dir -> the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(metrics, out)
    path = out / "report.md"
    atomic_write_text(path, render_markdown(metrics, plots))
    return path
