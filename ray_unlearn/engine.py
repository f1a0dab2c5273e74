"""One unlearning run, start to finish: prepare -> train -> save the hotfix -> evaluate -> report.

The phases are separate functions so the platform layer can wrap them (Ray Train runs `train`
on each worker; Tune shares the cached base outputs across trials) without changing them.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ray_unlearn import evaluate as ev
from ray_unlearn.config import TargetSpec, UnlearnConfig
from ray_unlearn.data import SampleCache, Target, remember_images, resolve_targets, save_image
from ray_unlearn.families import family_class, with_run_prompt
from ray_unlearn.families.base import DiffusionFamily, FrozenWeights
from ray_unlearn.families.ddpm import DDPMFamily
from ray_unlearn.loop import Report, UnlearnData, UnlearnLoop, autocast_dtype, resolve_device
from ray_unlearn.methods import METHODS, build_method
from ray_unlearn.metrics import Metrics
from ray_unlearn.surrogates import make_surrogates
from ray_unlearn.viz import before_after_figure, integrity_grid

log = logging.getLogger(__name__)

FAMILIES = {"ddpm": DDPMFamily}  # kept for callers that import it; families.FAMILIES is the registry


def load_family(cfg: UnlearnConfig, model_path: str | None = None, lora: bool = True) -> DiffusionFamily:
    device = resolve_device(cfg.train.device)
    path = model_path or cfg.model.path
    if path.startswith("s3://"):  # the engine knows no storage: its callers download first
        raise ValueError(f"model {path!r} is in object storage: the engine loads local folders and hub ids only; "
                         "download it first (ray_unlearn.storage.materialize, or platform.models.with_local_model)")
    model_cfg = cfg.model.model_copy(update={"path": path, "lora": cfg.model.lora if lora else None})
    model_cfg = with_run_prompt(model_cfg, cfg.targets)  # sd3: the targets' prompt conditions the run
    return family_class(cfg.model.family)(model_cfg, cfg.sampler, device, autocast_dtype(cfg.train.precision, device))


def build_metrics(cfg: UnlearnConfig, device: torch.device | str = "cpu") -> Metrics:
    return Metrics(cfg.eval.metrics, device=device)


@dataclass
class Reference:
    """Base-model outputs that no searched setting changes (remember set, integrity samples and,
    for a search, the targets and the base's outputs for them): computed once and shared by every
    trial of a search and every request of a batch."""

    remember: torch.Tensor  # images [0,1]
    integrity_base: torch.Tensor  # base model's outputs for the integrity seeds (a prefix serves a smaller n)
    cache_hits: dict
    targets: list[Target] | None = None
    target_base: torch.Tensor | None = None
    # a conditional family's other prompts to preserve (sd3: model.sd3.extra_prompts):
    # {prompt: {"remember": images, "integrity": base outputs}}, seeds as in `other_prompt_seeds`
    others: dict[str, dict[str, torch.Tensor]] | None = None

    def to_bytes(self) -> bytes:
        targets = None if self.targets is None else [
            {"id": t.id, "image": t.image, "noise": t.noise, "spec": t.spec.model_dump(mode="json")} for t in self.targets]
        buf = io.BytesIO()
        torch.save({"remember": self.remember, "integrity_base": self.integrity_base, "cache_hits": self.cache_hits,
                    "targets": targets, "target_base": self.target_base, "others": self.others}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Reference":
        d = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        targets = None if d["targets"] is None else [
            Target(t["id"], t["image"], t["noise"], TargetSpec.model_validate(t["spec"])) for t in d["targets"]]
        return cls(d["remember"], d["integrity_base"], d["cache_hits"], targets, d["target_base"], d.get("others"))


def reference_outputs(cfg: UnlearnConfig, family: DiffusionFamily | None = None, targets: bool = False,
                      progress: bool = True) -> Reference:
    """The base model's outputs that every trial / request shares, sampled in ONE pass (whatever
    the cache lacks, plus the targets' seeds when `targets=True`, i.e. for a search, whose
    targets are fixed). `cache_hits["base_passes"]` says whether a pass was needed (0 or 1)."""
    family = family or load_family(cfg, lora=False)
    cache = SampleCache(cfg.cache_dir)
    wanted = {"integrity_base": ev.integrity_seeds(cfg.eval)}
    got: dict[str, torch.Tensor | None] = {}
    if cfg.remember.source == "folder":
        got["remember"], _ = remember_images(family, cfg.remember, cache)
    else:
        wanted["remember"] = list(range(cfg.remember.seed_offset, cfg.remember.seed_offset + cfg.remember.n))
    for name, seeds in wanted.items():
        got[name] = cache.get(family, seeds)
    missing = [name for name in wanted if got[name] is None]
    resolved = resolve_targets(family, cfg.targets, generate=False) if targets else []
    seeded = [t for t in resolved if t.noise is not None]
    noise = [family.initial_noise(wanted[name]) for name in missing]
    if seeded:
        noise.append(torch.stack([t.noise for t in seeded]))
    hits = {name: got[name] is not None for name in wanted}
    hits["base_passes"] = 0
    if noise:
        out = family.generate(torch.cat(noise), progress="base outputs (one pass, shared)" if progress else None)
        hits["base_passes"] = 1
        offset = 0
        for name in missing:
            n = len(wanted[name])
            got[name] = out[offset:offset + n]
            cache.put(family, wanted[name], got[name])
            offset += n
        seeded_out = out[offset:]
    ref = Reference(got["remember"], got["integrity_base"], hits)
    if getattr(family, "other_prompts", None):  # sd3 with model.sd3.extra_prompts
        ref.others = other_prompt_outputs(cfg, family, cache, progress)
        hits["other_prompts_cached"] = sum(o["cached"] for o in ref.others.values())
        for o in ref.others.values():
            del o["cached"]
    if targets:
        base_out = {}
        for t, img in zip(seeded, seeded_out if seeded else []):
            base_out[id(t)] = img
            if t.image is None:
                t.image = img
        for t in resolved:  # an image without a seed: what the base makes of it (SDEdit, like judge)
            if id(t) not in base_out:
                base_out[id(t)] = ev.model_outputs_for_targets(family, [t])[0]
        ref.targets = resolved
        ref.target_base = torch.stack([base_out[id(t)] for t in resolved])
    return ref


def other_prompt_seeds(cfg: UnlearnConfig) -> tuple[list[int], list[int]]:
    """(remember seeds, integrity seeds) of each other prompt: the first `model.sd3.seeds_per_extra_prompt`
    of the run prompt's own ranges (the same initial noises, another prompt)."""
    k, r, i = cfg.model.sd3.seeds_per_extra_prompt, cfg.remember.seed_offset, cfg.eval.integrity_seed_offset
    return list(range(r, r + k)), list(range(i, i + k))


def other_prompt_outputs(cfg: UnlearnConfig, family: DiffusionFamily, cache: SampleCache,
                         progress: bool = True) -> dict[str, dict]:
    """The base model's remember and integrity samples of each other prompt, cached per prompt
    (`family.prompting(p)` keys the cache by p)."""
    remember, integrity = other_prompt_seeds(cfg)
    out = {}
    for p in family.other_prompts:
        with family.prompting(p):
            images = cache.get(family, remember + integrity)
            cached = images is not None
            if not cached:
                images = family.generate(family.initial_noise(remember + integrity),
                                         progress=f"base outputs of {p!r}" if progress else None)
                cache.put(family, remember + integrity, images)
        out[p] = {"remember": images[: len(remember)], "integrity": images[len(remember):], "cached": cached}
    return out


def with_other_prompts(prompt: str, integrity_base: torch.Tensor,
                       others: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The integrity base samples with the other prompts' joined (`Reference.others`), and their
    groups (prompt, number of samples) in sample order, the run's `prompt` first: what
    `evaluate.integrity_by_prompt` takes (engine.judge and request batches)."""
    base = torch.cat([integrity_base, *(o["integrity"] for o in others.values())])
    return base, [(prompt, len(integrity_base))] + [(p, len(o["integrity"])) for p, o in others.items()]


def other_prompts_integrity(cfg: UnlearnConfig, family: DiffusionFamily, others: dict[str, dict[str, torch.Tensor]],
                            progress: str | None = None) -> torch.Tensor:
    """The family's current outputs for each other prompt's integrity seeds, in `others` order, in
    one pass: what `with_other_prompts`'s base samples are compared against."""
    _, seeds = other_prompt_seeds(cfg)
    prompts = [p for p, o in others.items() for _ in range(len(o["integrity"]))]
    noise = family.initial_noise([seeds[j] for o in others.values() for j in range(len(o["integrity"]))])
    return family.generate(noise, cond=family.condition(prompts), progress=progress)


@dataclass
class Prepared:
    cfg: UnlearnConfig
    family: DiffusionFamily
    targets: list[Target]
    surrogates: torch.Tensor  # images [0,1]
    remember: torch.Tensor  # images [0,1]
    target_base: torch.Tensor  # base model's outputs for the targets
    integrity_base: torch.Tensor  # base model's outputs for the integrity seeds
    cache_hits: dict
    teacher: torch.nn.Module | None = None  # frozen original base network (remember.target='base')
    pull: tuple[float, list[torch.Tensor]] | None = None  # (lambda, anchors): the L2 pull (continual.pull)
    others: dict[str, dict[str, torch.Tensor]] | None = None  # other prompts' base samples (Reference.others)
    surrogate_info: list[dict] | None = None  # adaptive SDEdit's choice per target (surrogates.adaptive_sdedit)
    steps_trained: int | None = None  # set by `train` (train.extra_rounds may add rounds)
    forget_weights: torch.Tensor | None = None  # per target sampling weight (anchored replay); None: uniform
    round_check: tuple | None = None  # (Metrics, threshold) of train.extra_rounds' test, made on first use
    kept: torch.Tensor | None = None  # [targets] bool: still above the rounds' bar at the last check
    excess: float | None = None  # the last check's worst target: its SSCD minus the rounds' bar
    best_check: dict | None = None  # set by `train` when it ended on an earlier check's weights (train.round_keep_best)
    # continual.replay_as 'hold': (the done requests' outputs on the serving weights [H,C,H,W] in [0,1],
    # the initial noise each came from) and the frozen serving network; None: no hold term
    hold: tuple[torch.Tensor, torch.Tensor] | None = None
    hold_teacher: torch.nn.Module | None = None

    def data(self) -> UnlearnData:
        f = self.family
        forget = torch.stack([t.image for t in self.targets])
        if not self.others:
            return UnlearnData(f.encode(forget).cpu(), f.encode(self.surrogates).cpu(), f.encode(self.remember).cpu(),
                               forget_weights=self.forget_weights, **self._forget_noise(), **self._hold(False))
        # other prompts join the remember set: every sample then carries its prompt's embeddings
        remember = torch.cat([self.remember, *(o["remember"] for o in self.others.values())])
        prompts = [f.prompt] * len(self.remember) + [p for p, o in self.others.items() for _ in range(len(o["remember"]))]
        return UnlearnData(f.encode(forget).cpu(), f.encode(self.surrogates).cpu(), f.encode(remember).cpu(),
                           forget_cond=f.condition([f.prompt] * len(forget)), remember_cond=f.condition(prompts),
                           forget_weights=self.forget_weights, **self._forget_noise(), **self._hold(True))

    def _hold(self, conditioned: bool) -> dict:
        """The hold samples in the family's space (with the run prompt's condition when every sample
        carries one), or nothing."""
        if self.hold is None:
            return {}
        f, (images, noise) = self.family, self.hold
        cond = f.condition([f.prompt] * len(images)) if conditioned else None
        return {"hold": f.encode(images.to(f.device)).cpu(), "hold_noise": noise.float().cpu(), "hold_cond": cond}

    def _forget_noise(self) -> dict:
        """Where each target's sampling path starts (its initial noise, or its image's inversion), for
        forget samples noised along the path (method.path_noise)."""
        starts = [t.path_start for t in self.targets]
        known = [s is not None for s in starts]
        if not any(known):
            return {}
        like = next(s for s in starts if s is not None)
        noise = torch.stack([(s if s is not None else torch.zeros_like(like)).float().cpu() for s in starts])
        return {"forget_noise": noise, "forget_noise_known": torch.tensor(known)}


def prepare(cfg: UnlearnConfig, family: DiffusionFamily | None = None, surrogates: bool = True,
            reference: Reference | None = None, base: DiffusionFamily | None = None) -> Prepared:
    """Everything computed before any weight changes (`surrogates=False`: for evaluation only,
    which never reads them). `reference`: shared base outputs (else from the on-disk cache).
    `base`: the model the targets' "before" outputs come from, when `family` is not the base
    (sequential unlearning starts each request from the previous hotfix)."""
    family = family or load_family(cfg)
    if reference is not None and reference.targets is not None:
        targets, target_base = reference.targets, reference.target_base
    else:
        targets, target_base = resolve_targets(base or family, cfg.targets), None
    images = torch.stack([t.image for t in targets])
    reference = reference or reference_outputs(cfg, base or family)
    surrogate_info = None
    if surrogates and METHODS[cfg.method.name].uses_surrogate:
        with family.editing(cfg.surrogate.prompt):  # sd3: SDEdit's optional edit prompt
            edited, surrogate_info = _surrogates(cfg, family, images.to(family.device), reference.remember)
    else:  # baselines and evaluation never read it: skip the SDEdit pass
        edited = images.clone()
    n = cfg.eval.n_integrity
    if len(reference.integrity_base) < n:
        raise ValueError(f"the shared reference holds {len(reference.integrity_base)} integrity samples, "
                         f"this run needs eval.n_integrity={n}")
    if target_base is None:
        target_base = ev.model_outputs_for_targets(base or family, targets)
    if surrogates and getattr(cfg.method, "path_noise", 0) > 0:
        path_starts(family, targets)
    return Prepared(cfg, family, targets, edited, reference.remember, target_base, reference.integrity_base[:n],
                    dict(reference.cache_hits), anchor_teacher(cfg, family, base), others=reference.others,
                    surrogate_info=surrogate_info)


def hold_set(prep: Prepared, specs: list[TargetSpec], outputs: list[torch.Tensor | None] | None = None) -> int:
    """continual.replay_as 'hold': the done requests `specs` as hold samples of `prep`, taken from
    the model about to train (the serving weights): each one's initial noise (its seed, else its
    picture's inversion), the output the serving weights make from it (`outputs[i]` when the
    caller already sampled it from that noise on these weights; else sampled here), and a frozen
    copy of the serving network's trained parameters (FrozenWeights) as their teacher. Returns how
    many are held (a picture that cannot be inverted is left out: it stays re-verified on every
    version)."""
    f = prep.family
    given = outputs or [None] * len(specs)
    if len(given) != len(specs):
        raise ValueError(f"{len(specs)} hold targets but {len(given)} outputs: they must pair up")
    targets = resolve_targets(f, specs, generate=False)
    path_starts(f, targets)
    known = [(t, out) for t, out in zip(targets, given) if t.path_start is not None]
    if not known:
        return 0
    noise = torch.stack([t.path_start.float().cpu() for t, _ in known])
    todo = [i for i, (_, out) in enumerate(known) if out is None]
    sampled = iter(f.generate(noise[todo].to(f.device)).cpu() if todo else [])
    prep.hold = (torch.stack([out.cpu() if out is not None else next(sampled) for _, out in known]), noise)
    prep.hold_teacher = FrozenWeights(f.model)
    return len(known)


def path_starts(family: DiffusionFamily, targets: list[Target]) -> None:
    """Give each target without known initial noise (a picture alone) the inversion of its image by
    the model about to be trained (deterministic DDIM run backwards), once: method.path_noise then
    noises its forget samples along that path too. A family that cannot invert leaves them to fresh
    noise."""
    todo = [t for t in targets if t.path_start is None]
    if not todo:
        return
    inverted = family.invert(torch.stack([t.image for t in todo]))
    if inverted is None:
        log.info("%s cannot invert images: %d target(s) without a seed train on fresh noise only",
                 type(family).__name__, len(todo))
        return
    for t, x in zip(todo, inverted):
        t.inverted = x.cpu()


def _surrogates(cfg: UnlearnConfig, family: DiffusionFamily, images: torch.Tensor,
                remember: torch.Tensor) -> tuple[torch.Tensor, list[dict] | None]:
    """The targets' surrogates: adaptive SDEdit (surrogate.adapt) against the forget threshold the
    verdict will use (calibrated on the same remember images), else the configured edit as is."""
    s = cfg.surrogate
    if s.kind != "sdedit" or not s.adapt:
        return make_surrogates(family, images, s), None
    from ray_unlearn.metrics import MetricUnavailable
    from ray_unlearn.surrogates import adaptive_sdedit

    metrics = build_metrics(cfg, family.device)
    try:
        threshold = ev.calibrate_threshold(cfg.eval, metrics, remember)["value"]
        return adaptive_sdedit(family, images, s, metrics.sscd, threshold)
    except MetricUnavailable as err:  # no SSCD model: the configured strength, as without adapt
        log.warning("surrogate.adapt needs SSCD (%s): using SDEdit at strength %s as configured", err, s.strength)
        return make_surrogates(family, images, s), None


def anchor_teacher(cfg: UnlearnConfig, family: DiffusionFamily, base: DiffusionFamily | None) -> torch.nn.Module | None:
    """The frozen original base network for remember.target='base'. A separate `base` family (a
    batch starts from the serving hotfix and keeps the original base beside it) lends its network,
    which never trains; otherwise the family IS the base before training, so a frozen copy of what
    trains is taken (FrozenWeights)."""
    target = cfg.remember.target
    if target == "auto":
        target = "base" if METHODS[cfg.method.name].uses_surrogate else "noise"
    if target != "base":
        return None
    if base is not None and base is not family:
        return base.model.eval().requires_grad_(False)
    return FrozenWeights(family.model)


def train(prep: Prepared, report: Report | None = None, reduce_grads=None, state: dict | None = None,
          progress: bool = True, on_step=None, shard: tuple[int, int] = (0, 1)) -> UnlearnLoop:
    """Train `prep` (with train.extra_rounds' checks between rounds); `shard`: this worker's
    (rank, world) under Ray Train."""
    method = build_method(prep.cfg.method, prep.family)
    method.teacher, method.hold_teacher = prep.teacher, prep.hold_teacher
    loop = UnlearnLoop(prep.family, method, prep.data(), prep.cfg.train, reduce_grads, pull=prep.pull, shard=shard)
    if state is not None:
        loop.load_state_dict(state)
    run_report = report
    if on_step is not None:  # the platform checkpoints between steps
        def run_report(logs, step):
            if report is not None:
                report(logs, step)
            on_step(loop, logs, step)

    c = prep.cfg.train
    best = None  # the check whose worst target was lowest: (excess, steps, weights on the CPU)
    for k in range(c.extra_rounds + 1):
        if k > 0:
            if targets_forgotten(prep, loop.step_count):
                break
            if c.round_keep_best and prep.excess is not None and (best is None or prep.excess < best[0]):
                best = (prep.excess, loop.step_count, [p.detach().to("cpu", copy=True) for p in loop.params])
            loop.data.forget_weights = focus_on_kept(prep, c.round_focus)
            lr = c.lr * c.round_lr_growth ** k
            loop.cfg = c.model_copy(update={"steps": c.steps + k * (c.round_steps or max(1, c.steps // 2)), "lr": lr})
            for group in loop.optimizer.param_groups:
                group["lr"] = lr
        if loop.step_count < loop.cfg.steps:
            loop.run(run_report, progress=progress)
    else:  # the rounds ran out: end on the best check's weights if the last ones are worse
        if best is not None and not targets_forgotten(prep, loop.step_count) and best[0] < (prep.excess or 0.0):
            with torch.no_grad():
                for p, saved in zip(loop.params, best[2]):
                    p.copy_(saved.to(p.device))
            log.info("rounds ran out: back to the weights after %d steps (worst target %+.3f from the bar, "
                     "against %+.3f after %d)", best[1], best[0], prep.excess, loop.step_count)
            prep.best_check = {"steps": best[1], "excess": round(best[0], 4), "last_excess": round(prep.excess, 4)}
    loop.cfg = c
    prep.steps_trained = loop.step_count
    return loop


def focus_on_kept(prep: Prepared, share: float) -> torch.Tensor | None:
    """The forget sampling weights for the next round: the targets the last check found kept
    (`prep.kept`) get `share` of the forget samples between them, the rest the remainder, each
    group split by the targets' own weights (anchored replay's, else uniform). Unchanged when the
    share is 0, there is one target, or every target (or none) is kept."""
    base, kept, n = prep.forget_weights, prep.kept, len(prep.targets)
    if share <= 0 or n < 2 or kept is None or len(kept) != n or bool(kept.all()) or not bool(kept.any()):
        return base
    w = torch.ones(n) if base is None else base.float().cpu()
    k = kept.to(torch.bool)
    return torch.where(k, share * w / w[k].sum(), (1 - share) * w / w[~k].sum())


def targets_forgotten(prep: Prepared, steps: int) -> bool:
    """Whether every target's current output is below the forget threshold minus
    `train.round_margin` (one sample per target, SSCD to the target's picture; the threshold
    calibrated as the verdict's): train.extra_rounds' test. Unmeasurable (no SSCD model) counts as
    forgotten: no extra round. The SSCD model and the threshold are computed once per run."""
    from ray_unlearn.metrics import MetricUnavailable

    fam, cfg = prep.family, prep.cfg
    try:
        if prep.round_check is None:
            metrics = build_metrics(cfg, fam.device)
            prep.round_check = (metrics, ev.calibrate_threshold(cfg.eval, metrics, prep.remember)["value"])
        metrics, threshold = prep.round_check
        new = ev.model_outputs_for_targets(fam, prep.targets)
        sim = metrics.sscd(torch.stack([t.image for t in prep.targets]).to(new.device), new)
    except MetricUnavailable as err:
        log.warning("train.extra_rounds needs SSCD (%s): no extra round", err)
        return True
    bar = threshold - cfg.train.round_margin
    prep.kept = (sim >= bar).cpu()
    prep.excess = float((sim - bar).max())
    done = not bool(prep.kept.any())
    log.info("after %d steps: target SSCD %s (threshold %.3f, rounds stop below %.3f)%s", steps,
             ", ".join(f"{float(v):.3f}" for v in sim), threshold, bar, "" if done else ": another round")
    return done


def judge(prep: Prepared, metrics: Metrics | None = None, progress: bool = True,
          integrity_new: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Evaluate the family's current (unlearned) weights against the base outputs.
    `integrity_new`: the unlearned model's integrity samples when already generated (the Ray
    layer shards them across workers)."""
    fam, cfg = prep.family, prep.cfg
    metrics = metrics or build_metrics(cfg, fam.device)
    desc = "integrity (unlearned)" if progress else None
    target_new = ev.model_outputs_for_targets(fam, prep.targets)
    if integrity_new is None:
        integrity_new = fam.generate(fam.initial_noise(ev.integrity_seeds(cfg.eval)), progress=desc)
    base_all, new_all, groups = prep.integrity_base, integrity_new, None
    if prep.others:  # the other prompts' integrity samples join the set; each prompt is also judged apart
        base_all, groups = with_other_prompts(fam.prompt, prep.integrity_base, prep.others)
        new_all = torch.cat([integrity_new, other_prompts_integrity(cfg, fam, prep.others,
                                                                    desc and "integrity of the other prompts")])
    result = ev.evaluate_outputs(
        cfg.eval, metrics, prep.targets, prep.target_base, target_new, base_all, new_all, prep.remember
    )
    if groups:
        ev.integrity_by_prompt(cfg.eval, metrics, result, base_all, new_all, groups)
    if prep.surrogate_info is not None:
        result["surrogates"] = prep.surrogate_info
    if prep.steps_trained is not None:
        result["steps_trained"] = prep.steps_trained
    if prep.best_check is not None:
        result["weights_of_step"] = prep.best_check
    result["metric_sources"] = metrics.sources()
    return result, target_new, integrity_new


def write_outputs(prep: Prepared, out_dir: Path, result: dict, target_new, integrity_new, hotfix: dict,
                  wall_seconds: float, extra: dict | None = None) -> dict:
    cfg = prep.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = before_after_figure(
        out_dir / "before_after.png",
        torch.stack([t.image for t in prep.targets]),
        prep.surrogates if METHODS[cfg.method.name].uses_surrogate and (extra or {}).get("method") != "evaluate" else None,
        prep.target_base,
        target_new,
        result["targets"],
        prep.integrity_base,
        integrity_new,
        title=f"{cfg.method.name}: forgotten={result['all_forgotten']}  integrity SSIM={result['integrity']['ssim']}  "
              f"passed={result['passed']}" + ("" if result["passed"] or not result["integrity"].get("why")
                                               else f" ({result['integrity']['why']})"),
        specificity=result.get("specificity"),
    )
    grid = integrity_grid(out_dir / "integrity_grid.png", prep.integrity_base, integrity_new)
    samples = out_dir / "samples"
    samples.mkdir(exist_ok=True)
    for t, img in zip(prep.targets, target_new):
        save_image(img, samples / f"{t.id}-after.png")
    report = {
        "method": cfg.method.name,
        "config": cfg.model_dump(mode="json"),
        "base_model": prep.family.describe(),
        "hotfix": hotfix,
        **result,
        "pictures": {"before_after": str(picture), "integrity_grid": str(grid)},
        "cache": prep.cache_hits,
        "wall_seconds": round(wall_seconds, 2),
        **(extra or {}),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_unlearning(cfg: UnlearnConfig, out_dir: str | Path, report: Report | None = None, progress: bool = True) -> dict:
    """The whole engine for one request: what `ray-unlearn unlearn` runs."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    prep = prepare(cfg)
    history: list[dict] = []

    def _report(logs: dict, step: int) -> None:
        history.append({"step": step, **logs})
        if report is not None:
            report(logs, step)

    t_train = time.perf_counter()
    train(prep, _report, progress=progress)
    train_seconds = time.perf_counter() - t_train
    hotfix = prep.family.save(out_dir / "hotfix")
    result, target_new, integrity_new = judge(prep, progress=progress)
    (out_dir / "history.json").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.json").write_text(json.dumps(history) + "\n")
    return write_outputs(
        prep, out_dir, result, target_new, integrity_new, hotfix, time.perf_counter() - t0,
        {"train_seconds": round(train_seconds, 2), "steps": prep.cfg.train.steps},
    )


def render_seeds(cfg: UnlearnConfig, model_path: str, seeds: list[int], out_dir: str | Path) -> list[Path]:
    """`ray-unlearn sample`: the model's output for each seed (the same initial noise, and so the same
    image, as every other command uses for that seed) as OUT/seed-N.png, plus OUT/grid.png."""
    from torchvision.utils import save_image as save_grid

    if not seeds:
        raise ValueError("give at least one seed")
    family = load_family(cfg, model_path, lora=False)
    images = family.generate(family.initial_noise(list(seeds)), progress=f"sampling {len(seeds)} seed(s)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for seed, img in zip(seeds, images):
        save_image(img, out_dir / f"seed-{seed}.png")
        files.append(out_dir / f"seed-{seed}.png")
    save_grid(images.float().cpu(), out_dir / "grid.png", nrow=min(8, len(seeds)), padding=2, pad_value=1.0)
    return [*files, out_dir / "grid.png"]


def evaluate_models(cfg: UnlearnConfig, base_path: str, new_path: str, out_dir: str | Path | None = None,
                    progress: bool = True) -> dict:
    """`ray-unlearn evaluate`: the same figures for any two models of the same family."""
    t0 = time.perf_counter()
    base = load_family(cfg, base_path, lora=False)
    prep = prepare(cfg, base, surrogates=False)
    new = load_family(cfg, new_path, lora=False)
    prep.family = new
    result, target_new, integrity_new = judge(prep, progress=progress)
    prep.family = base
    out = {"base_model": base.describe(), "model": new.describe(), **result, "wall_seconds": round(time.perf_counter() - t0, 2)}
    if out_dir is not None:
        out = write_outputs(prep, Path(out_dir), result, target_new, integrity_new,
                            {"hotfix": new_path, "adapter": None}, time.perf_counter() - t0,
                            {"model": new.describe(), "method": "evaluate"})
    return out
