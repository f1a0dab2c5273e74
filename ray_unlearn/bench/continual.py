"""The continual benchmark's figures: the drawn seeds, one row per request, the summary per
strategy, the table, the integrity plot and the heat map (`jobs/benchmark.py --continual`).

The requests themselves go through the real queue and processor
(`ray_unlearn.platform.continual.run_continual`: an integration-layer module, since this layer
imports no queue); this module only turns what they recorded into figures.

Seeds: the first n draws of `random.Random(CONTINUAL_RNG_SEED).sample(SEED_POOL, n)`, every one
used, none screened or replaced (a longer run extends a shorter one: `sample` over a range this
large picks one seed per draw, in order). The constant is not the table's (2026): the table's and
the demo batch test's seeds are where the defaults have been looked at, so the continual benchmark
draws its own.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

CONTINUAL_RNG_SEED = 2027  # fixed before any draw; changing it is a new benchmark, not a re-roll
SEED_POOL = range(100, 1_000_000)  # below the remember (1,000,000) and integrity (2,000,000) seeds
STRATEGIES = ("sequential", "anchored", "joint", "merge")  # issue 12's four; config key continual.strategy
RESULTS = ("done", "failed", "returned", "not_produced")
# the targets for the default strategy (issue 12, point 4)
TARGET_FINAL_SSIM = 0.70
TARGET_FID_RATIO = 1.5


class ContinualError(ValueError):
    """Bad input to the benchmark (a flag, or an OUT written by another run): says what to do."""


def continual_seeds(n: int, rng_seed: int = CONTINUAL_RNG_SEED) -> list[int]:
    """The first n request seeds of the benchmark's fixed RNG (another fixed RNG for a tuning run:
    table.TUNING_RNG_SEED, never this one)."""
    if n < 1:
        raise ContinualError(f"the continual benchmark needs at least one request, got --requests {n}")
    if n > 1000:
        raise ContinualError(f"--requests {n}: at most 1000 (each request is a processor run and a registered version)")
    return random.Random(rng_seed).sample(SEED_POOL, n)


def check_strategies(strategies: list[str]) -> list[str]:
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ContinualError(f"unknown strategy {', '.join(map(repr, bad))}: choose from {', '.join(STRATEGIES)}")
    if len(set(strategies)) != len(strategies):
        raise ContinualError(f"a strategy is named twice: {strategies}")
    if not strategies:
        raise ContinualError("give at least one strategy (--strategies)")
    return list(strategies)


# ---- rows ------------------------------------------------------------------------------------------

def load_rows(path: Path, sets: list[str]) -> list[dict]:
    """A strategy's recorded rows (request order); [] when none were written yet. Rows made with
    other settings are not resumed: that would mix two benchmarks in one table."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if saved.get("sets") != list(sets):
        raise ContinualError(f"{path} was written with the settings {saved.get('sets')}, not {list(sets)}: rerun with "
                         "the same --set values (and --tiny or not) to resume it, or give a new --out")
    return saved["rows"]


def save_rows(path: Path, strategy: str, rows: list[dict], sets: list[str], rng_seed: int = CONTINUAL_RNG_SEED) -> None:
    """Written after every request (to a temporary file, then renamed: a kill never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"strategy": strategy, "rng_seed": rng_seed, "sets": list(sets), "rows": rows},
                              indent=2) + "\n")
    tmp.replace(path)


def model_ssim(row: dict) -> float:
    """Integrity SSIM of the model serving after this request against the base (1.0: still the base)."""
    ssim = (row.get("model") or {}).get("ssim")
    return 1.0 if row.get("version") is None else (float("nan") if ssim is None else float(ssim))


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(vals) if vals else None


def summarize(rows: list[dict], n_planned: int) -> dict:
    """One strategy's run in figures: what was done, where integrity ended, whether every done
    request is still forgotten on the final model, and whether training cost grew."""
    counts = {r: sum(row["result"] == r for row in rows) for r in RESULTS}
    last = rows[-1] if rows else None
    final_ver = [v for v in (last or {}).get("reverified", [])]
    done = [row for row in rows if row["result"] == "done"]
    # the first version made is always a single request on the base (a refused request leaves the base serving)
    first = next((row for row in rows if row.get("new_version")), None)
    fid_first = (first.get("model") or {}).get("fid") if first else None
    fid_final = (last.get("model") or {}).get("fid") if last and last.get("version") is not None else None
    ratio = fid_final / fid_first if fid_final is not None and fid_first else None
    all_forgotten = bool(done) and len(final_ver) == len(done) and all(v["forgotten"] is True for v in final_ver)
    train = [row["train_seconds"] for row in rows if row.get("train_seconds") is not None]  # requests that made a version
    k = min(5, len(train) // 2)
    first_k, last_k = (_mean(train[:k]), _mean(train[-k:])) if k else (None, None)
    final_ssim = model_ssim(last) if last else None
    return {
        "planned": n_planned, "recorded": len(rows), **counts,
        "final_version": last.get("version") if last else None,
        "final_ssim": final_ssim, "final_fid": fid_final, "fid_first": fid_first, "fid_ratio": ratio,
        "still_forgotten": sum(v["forgotten"] is True for v in final_ver), "all_done_forgotten": all_forgotten,
        "train_mean_first": first_k, "train_mean_last": last_k, "train_window": k,
        "train_ratio": last_k / first_k if first_k and last_k is not None else None,
        "wall_seconds": round(sum(row.get("wall_seconds") or 0.0 for row in rows), 1),
        "targets": {  # issue 12 point 4, on what was recorded (all of them only when every request ran)
            "all_done": len(rows) == n_planned and counts["done"] == n_planned,
            "all_forgotten_on_final": all_forgotten and counts["done"] == n_planned,
            f"final_ssim>={TARGET_FINAL_SSIM}": final_ssim is not None and final_ssim >= TARGET_FINAL_SSIM,
            f"fid_ratio<={TARGET_FID_RATIO}": ratio is not None and ratio <= TARGET_FID_RATIO,
        },
    }


TARGET_SINGLE_MEAN_SSIM, TARGET_SINGLE_MIN_SSIM, TARGET_SINGLE_N = 0.75, 0.6, 8  # issue 12 point 4


def summarize_single(rows: list[dict], n_planned: int) -> dict:
    """Single requests (`--single`: each seed alone on the base model): how many were forgotten
    (done), and the integrity SSIM each hotfix had, a refused one's included (the request's own
    figure: what shipping it would have left)."""
    ssims = [r["request"].get("integrity_ssim") for r in rows if (r.get("request") or {}).get("integrity_ssim") is not None]
    done = sum(r["result"] == "done" for r in rows)
    mean = _mean(ssims)
    return {
        "planned": n_planned, "recorded": len(rows), **{r: sum(row["result"] == r for row in rows) for r in RESULTS},
        "mean_ssim": mean, "min_ssim": min(ssims) if ssims else None,
        "below_bound": sum(x < TARGET_SINGLE_MIN_SSIM for x in ssims), "n_ssim": len(ssims),
        "wall_seconds": round(sum(row.get("wall_seconds") or 0.0 for row in rows), 1),
        "targets": {
            f"n>={TARGET_SINGLE_N}": len(rows) >= TARGET_SINGLE_N,
            "every_target_forgotten": bool(rows) and done == len(rows) == n_planned,
            f"mean_ssim>={TARGET_SINGLE_MEAN_SSIM}": mean is not None and mean >= TARGET_SINGLE_MEAN_SSIM,
            f"none_below_{TARGET_SINGLE_MIN_SSIM}": bool(ssims) and min(ssims) >= TARGET_SINGLE_MIN_SSIM,
        },
    }


def render_single(seeds: list[int], runs: dict[str, list[dict]], summaries: dict[str, dict], sets: list[str],
                  rng_seed: int = CONTINUAL_RNG_SEED) -> str:
    lines = [f"Single requests: each of seeds {', '.join(map(str, seeds))} (the first {len(seeds)} draws of "
             f"random.Random({rng_seed}).sample(range({SEED_POOL.start}, {SEED_POOL.stop:_}), n)) alone on "
             "the base model, through the processor; none screened or replaced.",
             f"Settings over the defaults: {', '.join(sets) or 'none'}.", "",
             "| strategy | recorded | forgotten (done) | failed | not produced | mean SSIM | min SSIM | below 0.6 "
             "| wall min |", "|" + "---|" * 9]
    for s, m in summaries.items():
        lines.append(f"| {s} | {m['recorded']}/{m['planned']} | {m['done']} | {m['failed'] + m['returned']} "
                     f"| {m['not_produced']} | {_f(m['mean_ssim'])} | {_f(m['min_ssim'])} | {m['below_bound']}/{m['n_ssim']} "
                     f"| {_f(m['wall_seconds'] / 60, 1)} |")
    lines += ["", "SSIM: each request's own integrity SSIM against the base, a refused request's included (what "
              "its hotfix would have left).", ""]
    lines += ["| # | seed | " + " | ".join(runs) + " |", "|" + "---|" * (len(runs) + 2)]
    for i, seed in enumerate(seeds, 1):
        cells = []
        for rows in runs.values():
            r = next((r for r in rows if r["seed"] == seed), None)
            if r is None:
                cells.append("not run")
                continue
            req = r.get("request") or {}
            cells.append(f"{'✓' if r['result'] == 'done' else '✗ ' + r['result']} SSCD {_f(req.get('sscd_base'))} -> "
                         f"{_f(req.get('sscd_new'))}, SSIM {_f(req.get('integrity_ssim'))}"
                         + (f", FID {_f((r.get('model') or {}).get('fid'), 1)}" if r["result"] == "done" else "")
                         + ("" if r["result"] == "done" else f" ({(r.get('reason') or '')[:120].replace('|', '/')})"))
        lines.append(f"| {i} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- the table -------------------------------------------------------------------------------------

def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _result_cell(row: dict) -> str:
    if row["result"] == "done":
        return f"done (v{row['version']})"
    why = (row.get("reason") or "").replace("|", "/").replace("\n", " ")
    return f"{row['result']}: {why[:160]}"


def render_markdown(seeds: list[int], runs: dict[str, list[dict]], summaries: dict[str, dict], sets: list[str],
                    rng_seed: int = CONTINUAL_RNG_SEED) -> str:
    lines = [f"Requests: seeds {', '.join(map(str, seeds))} (the first {len(seeds)} draws of "
             f"random.Random({rng_seed}).sample(range({SEED_POOL.start}, {SEED_POOL.stop:_}), n); "
             "none screened or replaced).",
             f"Settings over the defaults: {', '.join(sets) or 'none'}.", "",
             "## Summary", "",
             "| strategy | recorded | done | failed | not produced | final SSIM | final FID | FID ratio vs the first version "
             "| done still forgotten on the final model | train s, first 5 | train s, last 5 | wall min |",
             "|" + "---|" * 12]
    for s, m in summaries.items():
        lines.append(
            f"| {s} | {m['recorded']}/{m['planned']} | {m['done']} | {m['failed'] + m['returned']} | {m['not_produced']} "
            f"| {_f(m['final_ssim'])} | {_f(m['final_fid'], 1)} | {_f(m['fid_ratio'], 2)} "
            f"| {'yes' if m['all_done_forgotten'] else 'no'} ({m['still_forgotten']}/{m['done']}) "
            f"| {_f(m['train_mean_first'], 1)} | {_f(m['train_mean_last'], 1)} | {_f(m['wall_seconds'] / 60, 1)} |")
    lines += ["", "SSIM, FID and collateral (unrelated outputs below the forget threshold): the serving model after the request against the base model, on the integrity "
              "seeds (1.000: no version yet, the base serves); own SSIM: the request's hotfix before its gates, a "
              "refused one's included. The FID ratio divides the final FID by that of the first version (the first "
              "done request, made alone on the base); train s: mean training seconds over the first / last 5 "
              "requests that trained to a version.", ""]
    for s, rows in runs.items():
        lines += [f"## {s}", "", "| # | seed | result | request: SSCD base -> new, own SSIM | SSIM | FID | collateral "
                  "| still forgotten / done | wall s | train s |", "|" + "---|" * 10]
        by_seed = {r["seed"]: r for r in rows}
        for i, seed in enumerate(seeds, 1):
            r = by_seed.get(seed)
            if r is None:
                lines.append(f"| {i} | {seed} | not run | | | | | | | |")
                continue
            req = r.get("request") or {}
            sscd = (f"{_f(req.get('sscd_base'))} -> {_f(req.get('sscd_new'))}, SSIM {_f(req.get('integrity_ssim'))}"
                    if req.get("sscd_base") is not None else "n/a")
            lines.append(f"| {i} | {seed} | {_result_cell(r)} | {sscd} | {_f(model_ssim(r))} "
                         f"| {_f((r.get('model') or {}).get('fid'), 1)} | {_pct((r.get('model') or {}).get('collateral'))} "
                         f"| {r['n_forgotten']}/{r['n_done']} "
                         f"| {_f(r.get('wall_seconds'), 1)} | {_f(r.get('train_seconds'), 1)} |")
        lines.append("")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def print_summary(summaries: dict[str, dict], single: bool = False) -> None:
    """The summary per strategy as a rich table (printed after continual.md / single.md)."""
    from rich.console import Console
    from rich.table import Table

    if single:
        t = Table(title="Single requests, each alone on the base model")
        cols = ["strategy", "recorded", "forgotten", "mean SSIM", "min SSIM", "below 0.6", "targets met"]
        cells = [[s, f"{m['recorded']}/{m['planned']}", str(m["done"]), _f(m["mean_ssim"]), _f(m["min_ssim"]),
                  f"{m['below_bound']}/{m['n_ssim']}", f"{sum(m['targets'].values())}/{len(m['targets'])}"]
                 for s, m in summaries.items()]
    else:
        t = Table(title="Continual benchmark: the final model of each strategy")
        cols = ["strategy", "recorded", "done", "final SSIM", "FID ratio", "done still forgotten", "train s first -> last",
                "targets met"]
        cells = [[s, f"{m['recorded']}/{m['planned']}", str(m["done"]), _f(m["final_ssim"]), _f(m["fid_ratio"], 2),
                  f"{'yes' if m['all_done_forgotten'] else 'no'} ({m['still_forgotten']}/{m['done']})",
                  f"{_f(m['train_mean_first'], 1)} -> {_f(m['train_mean_last'], 1)}",
                  f"{sum(m['targets'].values())}/{len(m['targets'])}"] for s, m in summaries.items()]
    for c in cols:
        t.add_column(c)
    for row in cells:
        t.add_row(*row)
    Console(width=160).print(t)


# ---- pictures --------------------------------------------------------------------------------------

def integrity_plot(path: Path, runs: dict[str, list[dict]], min_ssim: float | None = None) -> Path:
    """Integrity SSIM of the serving model against the base vs the number of requests handled,
    one line per strategy (x = 0: the base model)."""
    from ray_unlearn.viz import plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for s, rows in runs.items():
        xs = [0] + [r["i"] for r in rows]
        ys = [1.0] + [model_ssim(r) for r in rows]
        line, = ax.plot(xs, ys, marker="o", ms=3, label=s)
        failed = [(r["i"], model_ssim(r)) for r in rows if r["result"] != "done"]
        if failed:  # a request that did not make a version: the model stayed as it was
            ax.plot(*zip(*failed), ls="none", marker="x", ms=7, color=line.get_color())
    for y, label in ((min_ssim, "integrity bound"), (TARGET_FINAL_SSIM, "final SSIM target")):
        if y is not None:
            ax.axhline(y, ls="--", lw=0.8, color="grey")
            ax.text(0.01, y + 0.005, label, fontsize=7, color="grey", transform=ax.get_yaxis_transform())
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("requests handled (x: not done, the model unchanged)")
    ax.set_ylabel("integrity SSIM vs the base")
    ax.set_title("Continual unlearning: integrity against request count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap_matrix(rows: list[dict]) -> tuple[list[str], list[int], list[list[float]]]:
    """(request labels, versions, SSCD / threshold per [request][version]); NaN before a request's
    own version. Rows: the done requests in order; columns: the versions the run made."""
    made = [r for r in rows if r["result"] == "done" and r.get("new_version")]
    versions = [r["version"] for r in made]
    order = [r["request_id"] for r in made]
    labels = [f"#{r['i']} seed {r['seed']}" for r in made]
    matrix = [[float("nan")] * len(versions) for _ in order]
    for j, r in enumerate(made):
        for v in r.get("reverified", []):
            if v["id"] in order and v.get("sscd") is not None and v.get("threshold"):
                matrix[order.index(v["id"])][j] = v["sscd"] / v["threshold"]
    return labels, versions, matrix


def heatmaps(path: Path, runs: dict[str, list[dict]]) -> Path:
    """One panel per strategy: done requests x versions, SSCD / threshold (below 1: still forgotten)."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    from ray_unlearn.viz import plt

    n = len(runs)
    fig, axes = plt.subplots(1, n, figsize=(1.0 + 5.2 * n, 4.6), squeeze=False, layout="constrained")
    im = None
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=1.6)
    for ax, (s, rows) in zip(axes[0], runs.items()):
        labels, versions, matrix = heatmap_matrix(rows)
        ax.set_title(s, fontsize=9)
        if not versions:
            ax.text(0.5, 0.5, "no version made", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        data = np.ma.masked_invalid(np.array(matrix, dtype=float))
        im = ax.imshow(np.clip(data, 0.0, 1.6), cmap="RdYlGn_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(versions)), [f"v{v}" for v in versions], fontsize=6, rotation=90)
        ax.set_yticks(range(len(labels)), labels, fontsize=6 if len(labels) > 12 else 7)
        ax.set_xlabel("version (one per done request)", fontsize=8)
        if len(versions) <= 12:
            for i in range(len(labels)):
                for j in range(len(versions)):
                    if not math.isnan(matrix[i][j]):
                        ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=6)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, extend="max", label="SSCD / threshold (< 1: forgotten)")
    fig.suptitle("Each done request re-verified on every later version", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
