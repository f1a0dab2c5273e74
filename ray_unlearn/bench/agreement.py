"""Cheaper verification at equal verdicts: the fast solver against the reference DDIM 50 (eta 1).

One run, one command (`python jobs/benchmark.py --sampler-agreement`): hotfixes are made in the run
from the configured model (the demo by default), each trained once with the configured (reference)
sampler, and every one is then judged twice, base and hotfix from the same initial noises, once per
sampler: the reference and each fast candidate (DPM-Solver++ 2M ODE and SDE at `fast_steps`):
- the base model itself (no hotfix): nothing may count as forgotten;
- the surrogate method with its defaults, on target seed A;
- NegGrad with its defaults, on target seed A;
- a sequential hotfix: the surrogate method on seed A (the hotfix above), then again on seed B
  starting from a copy of it, judged on both targets.
The target seeds are drawn from a fixed RNG (`SEED_RNG`), never picked. A candidate agrees when every
target's verdict (forgotten yes/no) and the pass/fail are the reference's, and each integrity SSIM is
within `SSIM_TOLERANCE` of the reference's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from pathlib import Path

from ray_unlearn.config import SamplerConfig, TargetSpec, UnlearnConfig
from ray_unlearn.engine import Prepared, build_metrics, judge, load_family, prepare, train
from ray_unlearn.evaluate import integrity_seeds, model_outputs_for_targets
from ray_unlearn.bench.loop_bench import with_sampler

SEED_RNG = 13  # issue 13: the draw of the target seeds
SEED_RANGE = (0, 10_000)
SSIM_TOLERANCE = 0.01
EVAL_SEEDS_NOTE = "integrity seeds: eval.integrity_seed_offset onwards (disjoint from the drawn target seeds)"


def draw_target_seeds(n: int = 2, rng_seed: int = SEED_RNG) -> list[int]:
    return random.Random(rng_seed).sample(range(*SEED_RANGE), n)


def candidates(fast_steps: int) -> dict[str, dict]:
    return {"dpmsolver++": {"kind": "dpmsolver++", "steps": fast_steps},
            "sde-dpmsolver++": {"kind": "sde-dpmsolver++", "steps": fast_steps}}


def _judge_with(prep: Prepared, base_fam, hot_fam, update: dict, metrics) -> dict:
    """Judge `hot_fam` against `base_fam` with the sampler changed by `update`: both sample from the
    same initial noises (targets' seeds and integrity seeds) with the same per-sample noise."""
    base_v, hot_v = with_sampler(base_fam, **update), with_sampler(hot_fam, **update)
    t0 = time.perf_counter()
    target_base = model_outputs_for_targets(base_v, prep.targets)
    integrity_base = base_v.generate(base_v.initial_noise(integrity_seeds(prep.cfg.eval)))
    p = dataclasses.replace(prep, family=hot_v, target_base=target_base, integrity_base=integrity_base)
    result, _, _ = judge(p, metrics, progress=False)
    return {
        "sampler": f"{hot_v.sampler.kind} {hot_v.sampler.steps}" + (f" eta {hot_v.sampler.eta:g}" if hot_v.sampler.kind == "ddim" else ""),
        "evaluations_per_image": hot_v.evaluations_per_image(),
        "seconds": round(time.perf_counter() - t0, 2),
        "forgotten": {t["id"]: t["forgotten"] for t in result["targets"]},
        "sscd": {t["id"]: t["sscd_unlearned"] for t in result["targets"]},
        "integrity_ssim": result["integrity"]["ssim"],
        "passed": result["passed"],
    }


def run_sampler_agreement(cfg: UnlearnConfig | None = None, fast_steps: int = 20, out: str | Path | None = None,
                          progress: bool = True, n_integrity: int | None = None) -> dict:
    t_start = time.perf_counter()
    cfg = (cfg or UnlearnConfig()).model_copy(deep=True)
    if n_integrity is not None:
        cfg.eval.n_integrity = n_integrity
    say = print if progress else (lambda *a, **k: None)
    seed_a, seed_b = draw_target_seeds()
    reference = cfg.sampler
    fast = candidates(fast_steps)
    base = load_family(cfg, lora=False)
    metrics = build_metrics(cfg, base.device)

    def cfg_for(method: str, seed: int) -> UnlearnConfig:
        c = cfg.model_copy(deep=True)
        c.targets = [TargetSpec(seed=seed)]
        c.method = _method(method)
        return c

    say(f"[agreement] target seeds drawn from random.Random({SEED_RNG}): A={seed_a}, B={seed_b}")
    t_train: dict[str, float] = {}
    rows: list[dict] = []
    made: dict[str, Prepared] = {}

    def surrogate_a() -> Prepared:
        prep = prepare(cfg_for("surrogate", seed_a))
        train(prep, progress=progress)
        made["surrogate_a"] = prep
        return prep

    def neggrad_a() -> Prepared:
        prep = prepare(cfg_for("neggrad", seed_a))
        train(prep, progress=progress)
        return prep

    def base_model() -> Prepared:  # judged as if it were a hotfix: nothing is forgotten
        return prepare(cfg_for("surrogate", seed_a), load_family(cfg, lora=False), surrogates=False)

    def sequential() -> Prepared:
        # request 1 is the surrogate-A hotfix above (same config and seed: the same training, run once);
        # request 2 starts from a copy of it
        first = made["surrogate_a"]
        second = prepare(cfg_for("surrogate", seed_b), family=copy.deepcopy(first.family), base=base)
        train(second, progress=progress)
        return dataclasses.replace(second, targets=first.targets + second.targets)

    # each hotfix is judged as soon as it exists, so an interrupted run keeps its finished rows
    for name, make in (("surrogate (defaults), seed A", surrogate_a), ("neggrad (defaults), seed A", neggrad_a),
                       ("base model (no hotfix)", base_model), ("sequential surrogate A then B", sequential)):
        say(f"[agreement] training: {name} ...")
        t0 = time.perf_counter()
        prep = make()
        t_train[name] = round(time.perf_counter() - t0, 1)
        say(f"[agreement] judging: {name} ...")
        ref = _judge_with(prep, base, prep.family, reference.model_dump(), metrics)
        row = {"hotfix": name, "reference": ref, "candidates": {}}
        for cname, update in fast.items():
            got = _judge_with(prep, base, prep.family, update, metrics)
            got["verdicts_agree"] = got["forgotten"] == ref["forgotten"] and got["passed"] == ref["passed"]
            got["ssim_delta"] = (None if got["integrity_ssim"] is None or ref["integrity_ssim"] is None
                                 else round(got["integrity_ssim"] - ref["integrity_ssim"], 4))
            got["ssim_agrees"] = got["ssim_delta"] is not None and abs(got["ssim_delta"]) <= SSIM_TOLERANCE
            row["candidates"][cname] = got
        rows.append(row)
        say(f"[agreement] {name}: " + json.dumps({k: {kk: v[kk] for kk in ("forgotten", "integrity_ssim", "passed")}
                                                   for k, v in [("reference", ref), *row["candidates"].items()]}))
        if out is not None:  # partial results survive an interrupted run
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "sampler_agreement.partial.json").write_text(json.dumps(rows, indent=2) + "\n")
    summary = {}
    for cname in fast:
        cuts = [r["reference"]["evaluations_per_image"] / r["candidates"][cname]["evaluations_per_image"] for r in rows]
        summary[cname] = {
            "steps": fast_steps,
            "verdicts_agree_all": all(r["candidates"][cname]["verdicts_agree"] for r in rows),
            "ssim_agrees_all": all(r["candidates"][cname]["ssim_agrees"] for r in rows),
            "max_abs_ssim_delta": max(abs(r["candidates"][cname]["ssim_delta"] or 0) for r in rows),
            "evaluations_cut": round(min(cuts), 3),
        }
        summary[cname]["agrees"] = (summary[cname]["verdicts_agree_all"] and summary[cname]["ssim_agrees_all"]
                                    and summary[cname]["evaluations_cut"] >= 2.5)
    res = {
        "model": cfg.model.path, "reference": f"{reference.kind} {reference.steps} eta {reference.eta:g}",
        "target_seeds": {"A": seed_a, "B": seed_b, "drawn_by": f"random.Random({SEED_RNG}).sample(range{SEED_RANGE}, 2)"},
        "n_integrity": cfg.eval.n_integrity, "ssim_tolerance": SSIM_TOLERANCE, "train_seconds": t_train,
        "rows": rows, "summary": summary, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "sampler_agreement.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _method(name: str):
    from ray_unlearn.methods import METHODS

    return METHODS[name].config()


def table(res: dict) -> list[tuple[str, str]]:
    rows = [("model / reference", f"{res['model']} / {res['reference']}"),
            ("target seeds", f"A={res['target_seeds']['A']}, B={res['target_seeds']['B']} ({res['target_seeds']['drawn_by']})")]
    for r in res["rows"]:
        ref = r["reference"]
        rows.append((r["hotfix"], f"reference: forgotten {ref['forgotten']}, SSIM {ref['integrity_ssim']}, passed {ref['passed']}"))
        for cname, c in r["candidates"].items():
            rows.append((f"  {c['sampler']}", f"forgotten {c['forgotten']}, SSIM {c['integrity_ssim']} "
                                               f"(d {c['ssim_delta']:+}), agree: verdicts {c['verdicts_agree']}, "
                                               f"SSIM {c['ssim_agrees']}" if c["ssim_delta"] is not None else str(c)))
    for cname, s in res["summary"].items():
        rows.append((f"{cname} {s['steps']}: agrees", f"{s['agrees']} (verdicts {s['verdicts_agree_all']}, SSIM "
                                                       f"{s['ssim_agrees_all']} max |d| {s['max_abs_ssim_delta']}, "
                                                       f"evaluations cut {s['evaluations_cut']}x)"))
    rows.append(("wall time", f"{res['wall_s']} s"))
    return rows
