"""How chaotic is a model's seed -> image map? Collateral forgetting under random weight noise.

A hotfix changes the weights a little; every unrelated output whose SSCD(base_i, new_i) falls below
the forget threshold counts as collateral forgetting (evaluate.specificity_figures). This job asks
how much of that a model shows when its weights move by the same small amount in a RANDOM direction,
with no unlearning at all: theta_k <- theta_k + sigma * rms(theta_k) * N(0, 1) per tensor, at
several sigma, several draws each (a fixed RNG; every draw reported). If random perturbations that
leave integrity SSIM as high as a good hotfix's already push many unrelated outputs below the
threshold, no method can pass a tight collateral bound on that model: the model (and the metric at
its resolution), not the method, sets the floor.

    python jobs/demo_model_sensitivity.py --out runs/sensitivity [--hotfix DIR ...]
    python jobs/demo_model_sensitivity.py --plot runs/sensitivity/sensitivity.json ... \
        [--pareto STORE/searches/ID/pareto.json] [--labels NAME ...] --out docs/demo_model_sensitivity.png

`--hotfix DIR` (pipeline dirs) adds real hotfixes' rows for comparison, with their relative weight
change ||dtheta|| / ||theta||. `--plot` draws collateral forgetting against integrity SSIM from
earlier results (and a search's trials, from its pareto.json) without sampling anything.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ray_unlearn import engine
from ray_unlearn import evaluate as ev
from ray_unlearn.config import load_config

SIGMAS = (3e-4, 1e-3, 3e-3, 1e-2)
DRAWS = 3
RNG_SEED = 20261130  # fixed before any draw


def _rel_change(model, base_state) -> float:
    num = den = 0.0
    for n, p in model.state_dict().items():
        if p.is_floating_point():
            num += float(((p - base_state[n]) ** 2).sum())
            den += float((base_state[n] ** 2).sum())
    return (num / den) ** 0.5


def _row(metrics, base_imgs, base_emb, new_imgs, threshold, cfg) -> dict:
    shift = ev.unrelated_shift(metrics, base_imgs, new_imgs, base_emb)
    spec = ev.specificity_figures(cfg.eval, shift, threshold)
    ssim = float(metrics.ssim(base_imgs, new_imgs).mean())
    return {"ssim": round(ssim, 4), "median_sscd": spec["median"], "p10_sscd": spec["p10"],
            "collateral": spec["collateral"], "collateral_count": spec["collateral_count"], "n": spec["n"]}


def plot(results: list[str], paretos: list[str], out: str, labels: list[str] | None = None) -> Path:
    """Collateral forgetting against integrity SSIM. `labels` (one per results file) draws one
    series per model, so two models' sensitivities can be compared; files sharing a label pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels and len(labels) != len(results):
        raise SystemExit(f"--labels: give one label per results file ({len(results)}), got {len(labels)}")
    groups: dict[str, list[dict]] = {}
    for i, f in enumerate(results):
        groups.setdefault(labels[i] if labels else "", []).extend(json.loads(Path(f).read_text())["rows"])
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    markers = iter(("o", "s", "D", "v"))
    colours = iter(("tab:gray", "tab:orange", "tab:purple", "tab:brown"))
    for label, rows in groups.items():
        rnd = [r for r in rows if r["kind"] == "random"]
        ax.scatter([r["ssim"] for r in rnd], [100 * r["collateral"] for r in rnd], c=next(colours), marker=next(markers),
                   label=f"{label}: random weight noise" if label else "random weight noise (no unlearning)")
    trials = [t for f in paretos for t in json.loads(Path(f).read_text())["trials"] if t.get("collateral") is not None]
    if trials:
        ax.scatter([t["integrity"] for t in trials], [100 * t["collateral"] for t in trials], c="tab:blue",
                   marker="^", label="the demo search's 6 hotfixes (16 seeds)")
    for label, group in groups.items():
        hot = [r for r in group if r["kind"] == "hotfix"]
        if hot:
            ax.scatter([r["ssim"] for r in hot], [100 * r["collateral"] for r in hot], c="tab:red", marker="*", s=120,
                       label=f"{label}: the demo's chosen hotfix" if label else "its chosen hotfix, 32 seeds")
    ax.axhline(5, color="tab:green", ls="--", lw=1)
    ax.text(0.5 if not labels else 0.35, 6, "collateral gate: 5%", fontsize=7, color="tab:green")
    ax.set_xlabel("integrity SSIM (base vs changed model, same seeds)")
    ax.set_ylabel("collateral forgetting (%)")
    ax.set_title("collateral forgetting against integrity" if labels else "demo model: collateral forgetting follows integrity",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--n", type=int, default=64, help="unrelated (integrity) seeds")
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    ap.add_argument("--draws", type=int, default=DRAWS)
    ap.add_argument("--hotfix", nargs="*", default=[], help="hotfix model dirs to compare")
    ap.add_argument("--out", default="runs/sensitivity")
    ap.add_argument("--plot", nargs="*", default=None, help="draw from these sensitivity.json files; sample nothing")
    ap.add_argument("--pareto", nargs="*", default=[], help="with --plot: a search's pareto.json, its trials as points")
    ap.add_argument("--labels", nargs="*", default=None, help="with --plot: one label per results file (one series per model)")
    a = ap.parse_args(argv)
    if a.plot is not None:
        print(plot(a.plot, a.pareto, a.out, a.labels))
        return {}
    cfg = load_config(None, [f"eval.n_integrity={a.n}", *a.sets])
    fam = engine.load_family(cfg, lora=False)
    metrics = engine.build_metrics(cfg, fam.device)
    ref = engine.reference_outputs(cfg, fam)
    threshold = ev.calibrate_threshold(cfg.eval, metrics, ref.remember)["value"]
    seeds = ev.integrity_seeds(cfg.eval)
    base_imgs = ref.integrity_base[: len(seeds)]
    base_emb = metrics.sscd_embed(base_imgs)
    base_state = {k: v.clone() for k, v in fam.model.state_dict().items()}
    noise0 = fam.initial_noise(seeds)
    rows = []
    gen = torch.Generator().manual_seed(RNG_SEED)
    for sigma in a.sigmas:
        for d in range(a.draws):
            t0 = time.perf_counter()
            with torch.no_grad():
                for n, p in fam.model.named_parameters():
                    rms = base_state[n].pow(2).mean().sqrt()
                    p.copy_(base_state[n] + sigma * rms * torch.randn(p.shape, generator=gen))
            row = {"kind": "random", "sigma": sigma, "draw": d, "rel_change": round(_rel_change(fam.model, base_state), 6),
                   **_row(metrics, base_imgs, base_emb, fam.generate(noise0.clone()), threshold, cfg),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    fam.model.load_state_dict(base_state)
    for path in a.hotfix:
        hf = engine.load_family(cfg, model_path=path, lora=False)
        row = {"kind": "hotfix", "path": path, "rel_change": round(_rel_change(hf.model, base_state), 6),
               **_row(metrics, base_imgs, base_emb, hf.generate(noise0.clone()), threshold, cfg)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"threshold": threshold, "n": len(seeds), "rng_seed": RNG_SEED, "rows": rows}
    (out / "sensitivity.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
