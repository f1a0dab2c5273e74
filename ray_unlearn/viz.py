"""The pictures people look at: each target before/after, and integrity samples base vs unlearned."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _show(ax, img: torch.Tensor, title: str | None = None, color: str = "black") -> None:
    arr = img.detach().float().clamp(0, 1).cpu()
    if arr.shape[0] == 1:
        ax.imshow(arr[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(arr.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, color=color)


def before_after_figure(
    path: str | Path,
    targets: torch.Tensor,
    surrogates: torch.Tensor | None,
    target_base: torch.Tensor,
    target_new: torch.Tensor,
    rows: list[dict],
    integrity_base: torch.Tensor,
    integrity_new: torch.Tensor,
    title: str,
    n_integrity: int = 8,
    specificity: dict | None = None,
) -> Path:
    """Each target (the picture, its surrogate, base and unlearned outputs) above pairs of
    integrity samples; beside the first target, `specificity_histogram` when measured."""
    n_t = len(targets)
    n_i = min(n_integrity, len(integrity_base))
    cols = max(6 if specificity else 4, n_i)
    fig, axes = plt.subplots(n_t + 2, cols, figsize=(1.4 * cols, 1.55 * (n_t + 2)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if specificity:  # the free cells right of the first target's four panels, merged
        for ax in axes[0, 4:]:
            ax.remove()
        specificity_histogram(fig.add_subplot(axes[1, 0].get_gridspec()[0, 4:]), specificity, rows)
    for i in range(n_t):
        row = rows[i] if i < len(rows) else {}
        ok = row.get("forgotten")
        verdict = "forgotten" if ok else ("ARTIFACTS" if row.get("artifact") else "not forgotten")
        panels = [
            (targets[i], f"target {row.get('id', i)}", "black"),
            (surrogates[i] if surrogates is not None else None, "surrogate", "black"),
            (target_base[i], f"base  SSCD {row.get('sscd_base', float('nan')):.2f}", "black"),
            (target_new[i], f"after {row.get('sscd_unlearned', float('nan')):.2f}\n{verdict}", "green" if ok else "red"),
        ]
        for j, (img, label, color) in enumerate(panels):
            if img is None:  # the method uses no surrogate
                continue
            axes[i, j].axis("on")
            _show(axes[i, j], img, label, color)
    for j in range(n_i):
        for r, (imgs, label) in enumerate(((integrity_base, "base"), (integrity_new, "unlearned"))):
            ax = axes[n_t + r, j]
            ax.axis("on")
            _show(ax, imgs[j], f"{label} #{j}" if j == 0 else None)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def specificity_histogram(ax, spec: dict, rows: list[dict]) -> None:
    """SSCD(base_i, hotfix_i) of the unrelated outputs (`evaluate.specificity_figures`), with each
    target's own SSCD(base, hotfix), the specificity bound and the forget threshold marked."""
    ax.hist(spec["values"], bins=min(16, max(4, len(spec["values"]) // 2)), range=(0, 1), color="0.7")
    ax.axvline(spec["threshold"], color="tab:red", ls=":", lw=1, label="forget threshold")
    if spec.get("bound") is not None:
        ax.axvline(spec["bound"], color="tab:blue", ls="--", lw=1, label=f"p{spec['percentile']:g} (specific below)")
    for r in rows:
        if r.get("sscd_base_hotfix") is not None:
            ax.axvline(r["sscd_base_hotfix"], color="black", lw=2)
            ax.text(r["sscd_base_hotfix"], ax.get_ylim()[1] * 0.95, f" {r.get('id', 'target')}", fontsize=6,
                    va="top", rotation=90)
    ax.set_xlim(0, 1)
    ax.set_xlabel("SSCD(base, hotfix) per seed", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_title(f"{spec['n']} unrelated: median {spec['median']:.2f}, collateral {spec['collateral']:.0%}",
                 fontsize=7)
    ax.legend(fontsize=5, loc="upper left")


def integrity_grid(path: str | Path, base: torch.Tensor, new: torch.Tensor, n: int = 16) -> Path:
    """Alternating rows: base outputs, then the unlearned model's from the same noise."""
    from torchvision.utils import save_image

    n = min(n, len(base))
    per_row = 8
    rows = []
    for i in range(0, n, per_row):
        rows += [base[i : i + per_row], new[i : i + per_row]]
    grid = torch.cat(rows)
    if grid.shape[-1] < 128:  # small models: upscale so a person can see faces
        grid = torch.nn.functional.interpolate(grid, scale_factor=4, mode="nearest")
    save_image(grid, path, nrow=per_row, padding=2, pad_value=1.0)
    return Path(path)


def pareto_plot(path: str | Path, points: list[dict], front: list[dict], threshold: float | None,
                min_integrity: float | None = None, chosen: dict | None = None, title: str = "",
                x: str = "sscd") -> Path:
    """Every trial as (forgetting figure `x`, integrity SSIM); the front joined, each front point
    labelled with its collateral forgetting when measured; the forgetting boundary (`threshold`:
    the forget threshold for x='sscd', 0 for a search's relative objective x='forget') and the
    integrity bound as lines. Lower-right is better: forgotten and intact."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ok = [p for p in points if p.get(x) is not None and p.get("integrity") is not None]
    forgot = [p for p in ok if p.get("forgotten")]
    kept = [p for p in ok if not p.get("forgotten")]
    if kept:
        ax.scatter([p[x] for p in kept], [p["integrity"] for p in kept], marker="x", color="0.6",
                   label="did not forget (proxy score)")
    if forgot:
        ax.scatter([p[x] for p in forgot], [p["integrity"] for p in forgot], color="tab:blue", alpha=0.6,
                   label="forgot (proxy score)")
    if front:
        ax.plot([p[x] for p in front], [p["integrity"] for p in front], "-o", color="tab:red", label="Pareto front (re-checked at full size)")
        for p in front:
            if p.get("collateral") is not None:
                ax.annotate(f" {p['collateral']:.0%} collateral", (p[x], p["integrity"]), fontsize=6, color="tab:red")
    if chosen:
        ax.scatter([chosen[x]], [chosen["integrity"]], s=160, facecolors="none", edgecolors="black",
                   linewidths=1.5, label="chosen")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", ls=":", lw=1)
        ax.text(threshold, ax.get_ylim()[0], " forget threshold" if x == "sscd" else " forgotten, specifically: left",
                color="tab:red", fontsize=7, va="bottom")
    if min_integrity is not None:
        ax.axhline(min_integrity, color="tab:green", ls=":", lw=1)
    ax.set_xlabel("SSCD of the target after unlearning (lower = forgotten)" if x == "sscd" else
                  "max(SSCD - threshold, SSCD(base, hotfix) - unrelated p10)\n(lower = forgotten, and more than other outputs)",
                  fontsize=8)
    ax.set_ylabel("integrity SSIM vs base (higher = intact)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
