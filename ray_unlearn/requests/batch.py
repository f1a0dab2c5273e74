"""One batch: unlearning of the claimed requests under the continual strategy, the gates, and the commit.

Run by `ray_unlearn.requests.process.Processor` (see its docstring for the gates and the order of
the commit steps, and `lineage` for why each step is safe to crash after). A batch gets what it
needs passed in (`BatchContext`, the queue transitions, the lease keeper, its settings) and
writes to the local disk only in its scratch directory.

The strategy (`continual.strategy`; the weight arithmetic is in `ray_unlearn.continual`):
'sequential' and 'anchored' train each request on top of the current weights (they differ in what
the remember term regresses onto, and anchored's optional pull toward the base weights); 'merge'
trains each request alone from the base, stores its delta and evaluates base + the merge of every
delta along the lineage; 'joint' trains once from the base over every request of the lineage plus
the new ones, dropping a new request that fails its gates and training again without it.

On SD3 with `model.sd3.extra_prompts`, the integrity set holds the other prompts' samples too
(`engine.with_other_prompts`, one more generation pass per measurement), as `engine.judge`'s does:
every figure is pooled, each prompt is also judged apart (`evaluate.integrity_by_prompt`, in each
request's evidence), and one prompt below the SSIM bound fails the integrity gate.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ray_unlearn import continual, engine
from ray_unlearn import evaluate as ev
from ray_unlearn.config import TargetSpec
from ray_unlearn.data import ImageError, decode_image
from ray_unlearn.hashing import content_hash
from ray_unlearn.loop import DivergedError
from ray_unlearn.methods import METHODS
from ray_unlearn.metrics import MetricUnavailable
from ray_unlearn.requests.common import (
    REQUESTS_EXPERIMENT, BatchAborted, BatchContext, Outcome, Transitions, now_iso,
)
from ray_unlearn.requests.evidence import (
    Check, check_from_evidence, decode_descriptor, encode_descriptor, judge_checks, outputs_for, regressions, verify,
    verify_with_outputs,
)
from ray_unlearn.requests.images import normalise_image
from ray_unlearn.requests.lease import LeaseKeeper
from ray_unlearn.requests.lineage import parent_key
from ray_unlearn.requests.models import LeaseLost, RequestError, RequestRecord, screen_prompts
from ray_unlearn.storage import NotFoundError, StorageError, materialize

logger = logging.getLogger(__name__)

NOT_PRODUCED = "this model does not generate this image: nothing to remove"


def content_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _picture(png: bytes) -> torch.Tensor:
    arr = np.asarray(decode_image(png, formats=["PNG"]).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@dataclass
class BatchSettings:
    cfg: object  # UnlearnConfig: the batch's settings (targets empty)
    serving: object | None  # the registry Version that serves (None: the base model)
    scratch: Path  # the batch's private directory (removed by the processor on every exit path)
    train_unproduced: bool = False  # operator override for the whole batch, recorded in each evidence


@dataclass
class _Measured:
    """One request's figures after its training."""

    row: dict
    rows: list[dict]
    ssim: float
    integrity_new: torch.Tensor
    check: Check
    descriptor: dict
    train_s: float
    spec: dict | None = None  # evaluate.specificity_figures of this request's integrity samples
    gate: dict | None = None  # evaluate.integrity_gate: SSIM and collateral forgetting
    prompts: list[dict] | None = None  # evaluate.integrity_by_prompt: each prompt apart (sd3 extra_prompts)
    delta: dict | None = None  # strategy merge: this request's delta (trained weights - base)
    joint: dict | None = None  # strategy joint: what the training set held
    steps: int | None = None  # the optimizer steps trained (train.extra_rounds may add rounds)
    weights_of_step: dict | None = None  # the rounds ran out and ended on an earlier check's weights


class _Verdict(NamedTuple):
    """Gates 1-3 on one try (Batch._verdict)."""

    kind: str | None  # None: passed; 'fail' | 'return'
    reason: str
    attempt: dict  # the try's figures, for the evidence
    retriable: bool  # another try after the rest of the batch may mend it (continual.batch_retries)


class Batch:
    def __init__(self, ctx: BatchContext, moves: Transitions, keeper: LeaseKeeper, settings: BatchSettings,
                 out: Outcome):
        self.ctx, self.moves, self.keeper, self.out = ctx, moves, keeper, out
        self.cfg, self.serving, self.tmp = settings.cfg, settings.serving, settings.scratch
        self.train_unproduced = settings.train_unproduced
        self.parent = parent_key(self.serving)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.id = f"batch-{stamp}-{uuid.uuid4().hex[:8]}"
        out.batch, out.parent = self.id, self.parent
        self.passed: list[tuple[RequestRecord, dict]] = []  # requests that passed every gate, in order
        self.checks: list[Check] = []  # everything that must stay forgotten: earlier done + passed here
        self.run_id = None
        c = self.cfg.continual
        self.strategy = c.strategy
        self.remember_target = continual.remember_target(c.strategy, self.cfg.remember.target,
                                                         METHODS[self.cfg.method.name].uses_surrogate)
        self.deltas: dict[str, dict] = {}  # merge: the passed requests' deltas, in order
        self.lineage_deltas: list[dict] = []  # merge: the deltas of the requests along the lineage
        self.earlier_specs: list[TargetSpec] = []  # joint: the lineage's requests as targets
        self.earlier_ids: list[str] = []  # the request id of each of earlier_specs
        self.accept_margin = continual.accept_margin(self.cfg)
        self.retry: list[tuple[RequestRecord, str]] = []  # one by one: requests to try again after the rest
        self.tries: dict[str, list[str]] = {}  # why each retried request's earlier tries did not pass
        # done requests a try brought back (in this batch or, by the manifests, along the lineage): never held again
        self.brought_back: set[str] = set()

    # ---- settings and models --------------------------------------------------------------------
    def _load(self) -> None:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # our own per-request lines say where we are
        cfg = self.cfg
        self.base = engine.load_family(cfg, lora=False)
        self.base_weights = {n: p.detach() for n, p in self.base.model.named_parameters()}
        source = self.serving.source if self.serving else None
        # the engine loads local paths only: a hotfix in the store is copied here first (once per machine)
        local = str(materialize(source, Path(cfg.cache_dir).expanduser() / "models")) if source else None
        self.local = local
        if self.strategy == "joint":  # trains from the base; the serving model is loaded only to check it
            self.family = engine.load_family(cfg)
        elif self.strategy == "merge":  # evaluates base + the merged deltas; a trainer starts from the base each time
            self.family = engine.load_family(cfg, model_path=local, lora=False)
            self.trainer = engine.load_family(cfg)
            self.trainer_start = self._snapshot(self.trainer)
        else:  # sequential, anchored: on top of the serving weights
            self.family = engine.load_family(cfg, model_path=local)
        self.start = self._snapshot()
        logger.info("model: %s %r; method %s, %d steps per request, continual strategy %s (remember term: %s)",
                    f"version {self.serving.version} ({source})" if source else "the base model",
                    cfg.model.path, cfg.method.name, cfg.train.steps, self.strategy, self.remember_target)
        self.ref = engine.reference_outputs(cfg, self.base, progress=False)  # cached after the first batch
        self.seeds = ev.integrity_seeds(cfg.eval)
        self.integrity_base = self.ref.integrity_base[: len(self.seeds)]
        # sd3 with model.sd3.extra_prompts: the other prompts' integrity samples join the set and each
        # prompt is judged apart, as engine.judge does (groups: evaluate.integrity_by_prompt)
        self.others, self.groups = self.ref.others, None
        if self.others:
            self.integrity_base, self.groups = engine.with_other_prompts(self.family.prompt, self.integrity_base,
                                                                         self.others)
        self.metrics = engine.build_metrics(cfg, self.family.device)
        self.threshold = ev.calibrate_threshold(cfg.eval, self.metrics, self.ref.remember)
        self.reference_hf = float(ev.high_frequency_energy(self.integrity_base).max())
        self.bound = ev.ARTIFACT_FACTOR * self.reference_hf
        # every request's SSCD(base_i, hotfix_i) (evaluate.unrelated_shift) compares against these
        self.integrity_emb = self.metrics.sscd_embed(self.integrity_base)

    def _earlier_checks(self) -> list[Check]:
        """Everything the serving model must keep forgotten: the done requests, and the requests
        of committed batches along the lineage that are not completed yet (their processor died
        after the commit; they will be completed from the manifest, so they must not regress)."""
        ctx = self.ctx
        evidence: dict[str, dict] = {}
        for v in ctx.lineage.chain():
            batch = v.tags.get("batch")
            if batch:
                manifest = ctx.lineage.manifest(batch)
                evidence.update(manifest["evidence"])
                self.brought_back.update(manifest.get("brought_back", ()))
        records = {rec.id: rec for rec in ctx.queue.list("done")}
        evidence.update({rid: rec.evidence for rid, rec in records.items()})
        self.earlier_evidence = dict(sorted(evidence.items()))
        checks = []
        for rid, ev_ in sorted(evidence.items()):
            image, rec = None, records.get(rid)
            if ev_.get("seed") is None and (rec is None or rec.image_key is not None):
                try:  # a seedless request is judged from its picture while the picture is kept
                    image = self.family.prepare_images(_picture(ctx.queue.read_image(rid))[None])[0].cpu()
                except (RequestError, NotFoundError, ImageError, OSError):
                    image = None
            c = check_from_evidence(rid, ev_, image)
            if c is not None:
                checks.append(c)
        return checks

    # ---- the run --------------------------------------------------------------------------------
    def run(self, todo: list[RequestRecord]) -> None:
        t0 = time.perf_counter()
        self.cfg, todo = screen_prompts(self.cfg, todo, self.moves)  # sd3: one prompt per batch; ddpm: none
        if not todo:
            self.out.status, self.out.message = "nothing-passed", "no request fits this batch's prompt (each says why)"
            return
        try:
            self._load()
            self.checks = self._earlier_checks()
            if self.checks:
                rows = verify(self._serving_model(), self.metrics, self.checks, self.bound)
                bad = regressions(rows)
                if bad:
                    raise BatchAborted(
                        f"the serving model does not forget {len(bad)} request(s) already done ("
                        + ", ".join(f"{r['id']}: SSCD {r['sscd']:.3f} >= {r['threshold']:.3f}" for r in bad[:3])
                        + "): it does not descend from the versions that applied them; restore the alias")
                logger.info("%d earlier request(s) checked on the serving model: still forgotten", len(rows))
            if self.strategy == "merge":
                self._start_merge()
            elif self.strategy == "joint":
                self._start_joint()
            elif self.strategy == "anchored" and self.cfg.continual.replay:
                self._start_replay()
        except MetricUnavailable as err:
            raise BatchAborted(f"a metric the gates need is unavailable: {err}") from None
        self._start_run()
        try:
            if self._trains_together(todo):  # one training over this batch's requests (and the earlier ones)
                self._together(todo)
            else:
                for i, rec in enumerate(todo, 1):
                    self.keeper.check()
                    logger.info("[%d/%d] %s (seed %s, attempt %d)", i, len(todo), rec.id, rec.seed, rec.attempts)
                    self._one(rec)
                self._retry_in_batch()
            if not self.passed:
                self.out.status = "nothing-passed"
                self.out.message = "no request passed its gates: nothing to promote"
                self._end_run("FINISHED")
                return
            self._commit(time.perf_counter() - t0)
        except BaseException:
            self._end_run("FAILED")
            raise

    def _start_run(self) -> None:
        from ray_unlearn.platform.tracking import Tracker

        ctx = self.ctx
        self.tracker = Tracker(ctx.tracking_uri, experiment=REQUESTS_EXPERIMENT)
        params = {**self.cfg.model_dump(mode="json", exclude={"targets", "cache_dir"}),
                  "batch": {"id": self.id, "parent": self.parent, "limit": ctx.limit, "retention": ctx.retention}}
        self.run_id = self.tracker.start_run(self.id, params=params, tags={
            "batch": self.id, "parent_version": self.parent, "holder": ctx.holder, "model_name": ctx.registry.name})

    def _end_run(self, status: str) -> None:
        if self.run_id is not None:
            try:
                self.tracker.end_run(self.run_id, status)
            except Exception as err:  # tracking is evidence, not the protocol: never mask the real outcome
                logger.warning("could not end MLflow run %s: %s", self.run_id, err)
            self.run_id = None  # ended once

    # ---- the continual strategy ------------------------------------------------------------------
    def _serving_model(self):
        """The model that serves now, for the check of the earlier requests (joint trains from the
        base, so the serving hotfix is loaded beside it for this check only)."""
        if self.strategy != "joint":
            return self.family
        return engine.load_family(self.cfg, model_path=self.local, lora=False) if self.local else self.base

    def _built_by_batches(self) -> None:
        """joint and merge rebuild the hotfix from the base out of the lineage's requests: every
        version along the lineage must be a batch's, else what it changed would be dropped."""
        for v in self.ctx.lineage.chain():
            if not v.tags.get("batch"):
                raise BatchAborted(
                    f"continual.strategy={self.strategy} rebuilds the hotfix from the base model out of the requests "
                    f"along the lineage, but version {v.version} was not made by a request batch (e.g. a promoted "
                    "search point): what it changed would be dropped; use continual.strategy=anchored")

    def _start_merge(self) -> None:
        """The lineage's deltas, loaded and checked (base + their merge must be the serving model)."""
        self._built_by_batches()
        store = self.ctx.store
        for rid, e in self.earlier_evidence.items():
            d = e.get("delta")
            if not d:
                raise BatchAborted(
                    f"continual.strategy=merge: request {rid} was applied by strategy {e.get('strategy', 'sequential')} "
                    "and has no stored delta; merge builds every hotfix as the base + the deltas of the requests along "
                    "the lineage, so it cannot build on this lineage: use continual.strategy=anchored or joint")
            try:
                data = store.get_bytes(d["key"])
            except (NotFoundError, StorageError) as err:
                raise BatchAborted(f"continual.strategy=merge: the delta of request {rid} cannot be read ({err})") from None
            if content_sha(data) != d.get("sha256"):
                raise BatchAborted(f"continual.strategy=merge: the stored delta of request {rid} ({d['key']}) does not "
                                   "match its checksum: it was altered or corrupted in storage")
            self.lineage_deltas.append(continual.load_delta(data))
        if not self.lineage_deltas:
            return
        serving = self._snapshot()
        self._apply_merge([])
        drift = max(float((p.detach() - serving[n]).abs().max()) for n, p in self.family.model.named_parameters())
        c = self.cfg.continual
        used = {(e.get("settings", {}).get("continual", {}).get("merge_method"),
                 e.get("settings", {}).get("continual", {}).get("ties_density")) for e in self.earlier_evidence.values()}
        if drift > 1e-4 and used != {(c.merge_method, c.ties_density)}:  # the gates re-verify every earlier request
            logger.warning("merge: the lineage was merged with %s, this batch merges its %d delta(s) with %s "
                           "(density %s): the weights move by up to %.2e before any training", sorted(used, key=str),
                           len(self.lineage_deltas), c.merge_method, c.ties_density, drift)
        elif drift > 1e-4:
            raise BatchAborted(f"the serving model is not the base + the merge of its lineage's {len(self.lineage_deltas)} "
                               f"delta(s) (max |difference| {drift:.2e}): restore the alias or use another strategy")
        self.start = self._snapshot()
        logger.info("merge: %d delta(s) along the lineage; the serving model is the base + their %s",
                    len(self.lineage_deltas), self.cfg.continual.merge_method)

    def _apply_merge(self, extra: list[dict]) -> None:
        """The evaluated model = base + merge(lineage deltas, passed deltas, `extra`)."""
        c = self.cfg.continual
        deltas = [*self.lineage_deltas, *self.deltas.values(), *extra]
        merged = continual.merge_deltas(deltas, c.merge_method, c.ties_density) if deltas else {}
        continual.apply_delta(self.family.model, self.base_weights, merged)

    def _start_joint(self) -> None:
        """The lineage's requests as targets: regenerated from the base by their seed, or their
        kept picture (a seedless request whose picture is gone stops the batch)."""
        self._built_by_batches()
        gone = self._lineage_specs()
        if gone:
            raise BatchAborted(
                f"continual.strategy=joint retrains every request along the lineage from the base model, but "
                f"request {gone[0]} has no seed and its picture was purged (retention delete): it cannot be "
                "retrained; use continual.strategy=anchored or merge for this lineage, or keep pictures "
                "(--retention keep) from the first batch on")
        logger.info("joint: %d earlier request(s) along the lineage join the training set (%d from their seed)",
                    len(self.earlier_specs), sum(s.seed is not None for s in self.earlier_specs))

    def _start_replay(self) -> None:
        """anchored replay: the lineage's done requests as targets (held or forgotten again), regenerated from the base
        by their seed, or their kept picture; one whose picture is gone is skipped (it stays
        re-verified on every version, as without replay)."""
        skipped = len(self._lineage_specs())
        how = ("are held (those near the threshold forgotten again)" if self.cfg.continual.replay_as == "hold"
               else "join each request's forget set")
        logger.info("anchored replay: %d earlier request(s) %s%s", len(self.earlier_specs), how,
                    f" ({skipped} without seed or picture left out)" if skipped else "")

    def _lineage_specs(self) -> list[str]:
        """The lineage's done requests as targets into self.earlier_specs: by their seed (the base
        regenerates them), else their kept picture. Returns the ids of those with neither."""
        gone = []
        for rid, e in self.earlier_evidence.items():
            if e.get("seed") is not None:
                self.earlier_specs.append(TargetSpec(seed=int(e["seed"]), prompt=e.get("prompt")))
                self.earlier_ids.append(rid)
                continue
            try:
                png = self.ctx.queue.read_image(rid)
            except (RequestError, NotFoundError, StorageError):
                gone.append(rid)
                continue
            path = self.tmp / f"earlier-{rid}.png"
            path.write_bytes(png)
            self.earlier_specs.append(TargetSpec(image=str(path), prompt=e.get("prompt")))
            self.earlier_ids.append(rid)
        return gone

    def _request_cfg(self, targets: list[TargetSpec]):
        """The batch's settings for one training: its targets, the remember term resolved for the strategy."""
        return self.cfg.model_copy(update={
            "targets": targets, "remember": self.cfg.remember.model_copy(update={"target": self.remember_target})})

    def _pull(self, family) -> tuple[float, list[torch.Tensor]] | None:
        """(lambda, anchors) of the L2 pull toward the original base (None: off). Full weights:
        the base's own tensors; a LoRA (joint, merge: it starts from the base): its initial value."""
        lam = self.cfg.continual.pull
        if lam == 0:
            return None
        named = [(n, p) for n, p in family.model.named_parameters() if p.requires_grad]
        if getattr(family, "lora", None) is None:
            return lam, continual.pull_anchors(named, self.base_weights)
        return lam, continual.initial_anchors(p for _, p in named)

    def _train(self, prep) -> dict | None:
        """Train; under merge, then set the evaluated model to base + the merge with this delta."""
        engine.train(prep, progress=False)
        if self.strategy != "merge":
            return None
        effective = dict(self.trainer.merged_unet().named_parameters())
        delta = continual.weight_delta(effective, self.base_weights)
        self._apply_merge([delta])
        return delta

    def _delta_key(self, rid: str) -> str:
        return f"deltas/{rid}/{self.id}.safetensors"

    # ---- one request ----------------------------------------------------------------------------
    def _snapshot(self, family=None) -> dict[str, torch.Tensor]:
        family = family or self.family
        return {n: p.detach().clone() for n, p in family.model.named_parameters() if p.requires_grad}

    def _restore(self, snap: dict[str, torch.Tensor], family=None) -> None:
        family = family or self.family
        with torch.no_grad():
            for n, p in family.model.named_parameters():
                if n in snap:
                    p.copy_(snap[n])

    def _image(self, rec: RequestRecord) -> Path:
        """The request's picture, checked again (storage may have changed since submit), in scratch."""
        q = self.ctx.queue
        img = normalise_image(q.read_image(rec.id), max_bytes=q.max_bytes, allowed_formats=q.allowed_formats)
        if img.sha256 != rec.content_sha256:
            raise RequestError(f"the stored image is not the submitted picture (sha256 {img.sha256[:12]}... != "
                               f"{rec.content_sha256[:12]}...): it was altered or corrupted in storage")
        path = self.tmp / f"{rec.id}.png"
        path.write_bytes(img.png)
        return path

    def _retry_in_batch(self) -> None:
        """continual.batch_retries: each request that was not forgotten (or by too little) or that
        brought an earlier one back tries again after the rest of the batch, on the weights then,
        with the next train.seed; the last try's verdict moves it."""
        for round_ in range(1, self.cfg.continual.batch_retries + 1):
            again, self.retry = self.retry, []
            for i, (rec, first) in enumerate(again, 1):
                self.keeper.check()
                logger.info("[retry %d, %d/%d] %s (seed %s) after: %s", round_, i, len(again), rec.id, rec.seed, first)
                self.tries.setdefault(rec.id, []).append(first)
                self._one(rec, retry=round_)

    def _one(self, rec: RequestRecord, retry: int = 0) -> None:
        started = now_iso()
        try:
            path = self._image(rec)
        except (RequestError, NotFoundError, StorageError) as err:
            self.moves.fail(rec.id, f"its image cannot be used: {err}")
            return
        earlier, held = self._replayed_split()
        cfg = self._request_cfg([*earlier, TargetSpec(image=str(path), seed=rec.seed, prompt=rec.prompt)])
        if retry:  # another draw of the noise and batches, on the weights the rest of the batch left
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": cfg.train.seed + retry})})
        k = len(earlier)
        snap = self._snapshot()
        trainer = self.family
        if self.strategy == "merge":  # each request alone from the base
            trainer = self.trainer
            self._restore(self.trainer_start, trainer)
        try:
            prep = engine.prepare(cfg, trainer, reference=self.ref, base=self.base)
            prep.pull = self._pull(trainer)
            self._hold(prep, held)
            if k:  # anchored replay: the new target keeps 1 - replay_share of every forget batch
                share = self.cfg.continual.replay_share
                prep.forget_weights = torch.tensor([share / k] * k + [1.0 - share])
            emb = self.metrics.sscd_embed(torch.cat([prep.targets[k].image[None].cpu(), prep.target_base[k:].cpu()]))
            sscd_base = float(emb[0] @ emb[1])
            go, override = self._produced(rec, sscd_base)
            if not go:
                return
            measured = self._train_and_measure(prep, [(rec, k, emb[0], emb[1])])[0]
        except MetricUnavailable as err:
            self._restore(snap)
            raise BatchAborted(f"a metric the gates need is unavailable: {err}") from None
        except DivergedError as err:  # the same settings diverge again: fail it, naming the step
            self._restore(snap)
            self.moves.fail(rec.id, str(err), sscd_base=round(sscd_base, 4))
            return
        except Exception as err:  # a model / numerical problem with this request: it may be retried
            self._restore(snap)
            self.moves.release_or_fail(rec, f"unlearning it raised {type(err).__name__}: {err}")
            return
        finally:
            path.unlink(missing_ok=True)  # the picture lives in memory from here on
        if self._gates(rec, measured, sscd_base, snap, retry):
            self._accept(rec, measured, sscd_base, started, override)

    def _replayed_by_id(self) -> list[tuple[str, TargetSpec]]:
        """anchored replay (continual.replay): the lineage's done requests and those passed in this
        batch, each with its request id (regenerated from the base by their seed, or a kept picture)."""
        if self.strategy != "anchored" or not self.cfg.continual.replay:
            return []
        passed = [(r.id, TargetSpec(seed=r.seed, prompt=r.prompt)) for r, _ in self.passed if r.seed is not None]
        return [*zip(self.earlier_ids, self.earlier_specs), *passed]

    def _replayed_split(self) -> tuple[list[TargetSpec], list[tuple[TargetSpec, torch.Tensor | None]]]:
        """(earlier requests trained as forget targets, earlier requests held, each with its output
        on the weights about to train when verify sampled it). replay_as 'forget': all of them
        forgotten again. 'hold': each is judged on the weights about to train; one at least
        `hold_margin` under the threshold is held, one closer to it (or not judged) is forgotten
        again, so that it is pushed back under before a new request can tip it over. One that a
        try brought back (in this batch, or in an earlier batch along the lineage: each manifest
        lists them) is forgotten again whatever its margin: holding it did not hold it, and the
        rounds then check it beside the new target."""
        pairs = self._replayed_by_id()
        c = self.cfg.continual
        if c.replay_as == "forget" or not pairs:
            return [spec for _, spec in pairs], []
        margin = self.cfg.train.round_margin if c.hold_margin is None else c.hold_margin
        ids = {rid for rid, _ in pairs}
        rows, outputs = verify_with_outputs(self.family, self.metrics, [x for x in self.checks if x.id in ids], self.bound)
        safe = {r["id"] for r in rows if r["sscd"] is not None and r["sscd"] < self.threshold["value"] - margin}
        unsafe = safe & self.brought_back
        safe -= unsafe
        again = [spec for rid, spec in pairs if rid not in safe]
        logger.info("anchored replay: %d done request(s) held, %d forgotten again (within %.3f of the threshold%s)",
                    len(pairs) - len(again), len(again), margin,
                    f", or brought back by an earlier try: {', '.join(sorted(unsafe))}" if unsafe else "")
        # a seeded request's verify output is its output for the seed: the hold image, sampled once
        return again, [(spec, outputs.get(rid) if spec.seed is not None else None) for rid, spec in pairs if rid in safe]

    def _hold(self, prep, held: list[tuple[TargetSpec, torch.Tensor | None]]) -> None:
        """replay_as 'hold': the done requests held where the serving weights have them."""
        if held:
            n = engine.hold_set(prep, [spec for spec, _ in held], outputs=[out for _, out in held])
            if n < len(held):
                logger.info("anchored replay: %d done request(s) without a path start (no seed, no inversion) not held",
                            len(held) - n)

    def _produced(self, rec: RequestRecord, sscd_base: float) -> tuple[bool, dict | None]:
        """Gate 0, before any training: the base model must produce the picture (its output for the
        seed, or its reconstruction of the picture, at or above the threshold); else there is nothing
        to remove and the request ends not_produced, unless an operator overrode it. (train it?,
        the override to record)"""
        t = self.threshold["value"]
        if sscd_base >= t:
            return True, None
        override = rec.produced_override or ("--train-unproduced (this batch)" if self.train_unproduced else None)
        judged = "its output for seed %d" % rec.seed if rec.seed is not None else "its reconstruction of the picture"
        figures = f"SSCD between the picture and the base model's {judged} is {sscd_base:.3f}, below the threshold {t:.3f}"
        if override:
            logger.warning("%s: %s; trained anyway (operator override: %s)", rec.id, figures, override)
            return True, {"not_produced": figures, "override": override}
        self.moves.not_produced(rec.id, f"{NOT_PRODUCED} ({figures})", {
            "content_sha256": rec.content_sha256, "seed": rec.seed, "sscd_base": round(sscd_base, 4),
            "threshold": self.threshold, "judged_by": judged, "settings": self._settings(),
            "checked_at": now_iso()})
        return False, None

    def _train_and_measure(self, prep, items: list[tuple[RequestRecord, int, torch.Tensor, torch.Tensor]]
                           ) -> list[_Measured]:
        """Train on `prep`, then each new request's figures; `items`: (request, its index in
        prep.targets, the picture's SSCD embedding, the base output's)."""
        fam = self.family
        t = time.perf_counter()
        delta = self._train(prep)
        train_s = time.perf_counter() - t
        new = ev.model_outputs_for_targets(fam, [prep.targets[i] for _, i, _, _ in items])
        if not bool(torch.isfinite(new).all()):
            raise DivergedError(prep.cfg.train.steps, "NaN", "the model's output for the picture", "after training")
        earlier, judged = outputs_for(fam, self.checks)
        # one SSCD pass: the new model's outputs for the pictures, and the re-checks
        emb = self.metrics.sscd_embed(torch.cat([new.cpu()] + ([earlier.cpu()] if judged else [])))
        self.sscd_source = self.metrics.sources().get("sscd", "sscd")
        hf_all = ev.high_frequency_energy(new)
        integrity_new = fam.generate(fam.initial_noise(self.seeds))
        if self.others:  # one more pass: the other prompts' outputs, in self.integrity_base's order
            integrity_new = torch.cat([integrity_new, engine.other_prompts_integrity(self.cfg, fam, self.others)])
        # specificity: the picture's output must have moved more than the unrelated outputs did
        shift = ev.unrelated_shift(self.metrics, self.integrity_base, integrity_new, self.integrity_emb)
        # a prompted target's copies among the integrity seeds are the target again (evaluate.target_copies)
        prompted = [prep.targets[i].image for _, i, _, _ in items if prep.targets[i].spec.prompt is not None]
        copies = None if not prompted else ev.target_copies(
            self.metrics, self.integrity_base, torch.stack(prompted), self.threshold["value"], self.integrity_emb)
        spec = ev.specificity_figures(self.cfg.eval, shift, self.threshold["value"], copies=copies)
        rows = judge_checks(self.checks, judged, earlier, emb[len(items):], self.bound)
        ssim = float(self.metrics.ssim(self.integrity_base, integrity_new).mean())
        gate = ev.integrity_gate(self.cfg.eval, {"ssim": round(ssim, 4), "unavailable": {}}, spec)
        prompts = None
        if self.groups:  # each prompt apart; one below the SSIM bound fails the gate, whatever the pooled mean
            prompts = ev.integrity_by_prompt(self.cfg.eval, self.metrics, {
                "integrity": gate, "forget_threshold": self.threshold, "specificity": spec, "all_forgotten": True,
            }, self.integrity_base, integrity_new, self.groups)
        out = []
        for j, (rec, i, picture_emb, base_out_emb) in enumerate(items):
            sscd_new, hf = float(picture_emb @ emb[j]), float(hf_all[j])
            target = ev.target_specificity(float(base_out_emb @ emb[j]), spec)
            forgotten, why = ev.target_verdict(sscd_new < self.threshold["value"], hf > self.bound, target["specific"])
            row = {"sscd_unlearned": round(sscd_new, 4), "hf_energy": round(hf, 4), "artifact": hf > self.bound,
                   **target, "forgotten": forgotten, "why": why}
            descriptor = encode_descriptor(picture_emb, self.sscd_source)
            check = Check(rec.id, rec.seed, decode_descriptor(descriptor), self.threshold["value"],
                          prep.targets[i].image if rec.seed is None else None)
            out.append(_Measured(row, rows, ssim, integrity_new, check, descriptor, train_s, spec, gate, prompts,
                                 delta, steps=prep.steps_trained, weights_of_step=prep.best_check))
        return out

    def _verdict(self, rec: RequestRecord, m: _Measured, sscd_base: float) -> _Verdict:
        """Gates 1-3 on the request's figures. kind None (passed) | 'fail': not forgotten (its own
        doing) | 'return': integrity or a regression, which depend on what else was unlearned.
        `retriable`: a failure that depends on chance and on where the weights stand, which another
        try after the rest of the batch may mend (not forgotten, by too little, an earlier one
        brought back, collateral forgetting with the SSIM inside its bound); never the SSIM bound
        (more requests only lower it)."""
        min_ssim = self.cfg.eval.min_integrity_ssim
        figures = f"SSCD {sscd_base:.3f} -> {m.row['sscd_unlearned']:.3f} (threshold {self.threshold['value']:.3f})"
        logger.info("  %s: %s, integrity SSIM %.3f (bound %s), %d earlier re-verified, %.0f s training",
                    rec.id, figures, m.ssim, min_ssim, len(m.rows), m.train_s)
        if m.prompts:
            logger.info("  %s: integrity SSIM by prompt: %s", rec.id,
                        "; ".join(f"{r['prompt']!r} {r['ssim']} (min {r['ssim_min']}, n {r['n']})" for r in m.prompts))
        attempt = {"sscd_base": round(sscd_base, 4), "sscd_new": m.row["sscd_unlearned"],
                   "integrity_ssim": round(m.ssim, 4), "train_seconds": round(m.train_s, 2), "steps_trained": m.steps,
                   "weights_of_step": m.weights_of_step, "prompt": rec.prompt}
        if m.prompts:
            attempt["integrity_prompts"] = m.prompts
        if not m.row["forgotten"]:
            return _Verdict("fail", f"not forgotten with these settings: {figures}; {m.row['why']}", attempt, True)
        short = m.row["sscd_unlearned"] - (self.threshold["value"] - self.accept_margin)
        if self.accept_margin > 0 and short > 0:
            return _Verdict("fail", (f"forgotten by too little to stay forgotten: {figures}, {short:.3f} short of the margin "
                            f"{self.accept_margin:.3f} a request needs (continual.accept_margin), so the next request "
                            "that moves it a little would bring it back; more rounds (train.extra_rounds) or a "
                            "higher train.lr may get it there"), attempt, True)
        if m.ssim < min_ssim:
            return _Verdict("return", (f"integrity gate: unlearning it would leave SSIM {m.ssim:.3f} against the base, "
                                       f"below the bound {min_ssim}"), attempt, False)
        if m.gate is not None and not m.gate["ok"]:  # collateral forgetting (evaluate.integrity_gate)
            # collateral alone is partly chance; an SSIM below its bound (pooled or on one prompt) is not
            return _Verdict("return", f"integrity gate: {m.gate['why']}", attempt,
                            m.gate.get("failed") == ["collateral"] and m.gate.get("collateral") is not None)
        bad = regressions(m.rows)
        if bad:
            attempt["brought_back"] = [r["id"] for r in bad]
            return _Verdict("return", "unlearning it brought back " + ", ".join(
                f"{r['id']} (SSCD {r['sscd']:.3f} >= {r['threshold']:.3f})" for r in bad[:3]), attempt, True)
        return _Verdict(None, "", attempt, False)

    def _gates(self, rec: RequestRecord, m: _Measured, sscd_base: float, snap, retry: int = 0) -> bool:
        """Gates 1-3; a failed one restores the snapshot and moves the request (or, while
        continual.batch_retries allow and the failure is one another try may mend, holds it for a
        retry after the rest of the batch)."""
        kind, reason, attempt, retriable = self._verdict(rec, m, sscd_base)
        if kind is None:
            return True
        self.brought_back.update(attempt.get("brought_back", ()))
        self._restore(snap)
        if retry:
            attempt = {**attempt, "retry": retry}
        if retriable and retry < self.cfg.continual.batch_retries:
            self.retry.append((rec, reason))  # its verdict waits for the retry
            return False
        if retry:
            attempt["earlier_tries"] = self.tries.get(rec.id, [])
        if kind == "fail":
            self.moves.fail(rec.id, reason, **attempt)
        else:
            self.moves.release_or_fail(rec, reason, attempt)
        return False

    # ---- one training over the batch's requests: joint, or anchored/sequential with `together` -----
    def _trains_together(self, todo: list[RequestRecord]) -> bool:
        """joint always; sequential and anchored when continual.together holds and the batch has
        more than one request (with one, training together is training it alone); merge never (each
        request is its own delta)."""
        if self.strategy == "joint":
            return True
        return self.strategy != "merge" and self.cfg.continual.together and len(todo) > 1

    def _together_plan(self, k: int, n: int) -> tuple[int, torch.Tensor | None]:
        """(steps, forget weights) of one training over k earlier targets and n new ones. joint:
        train.steps x (k + n) (joint_steps_per_request), every target alike. Otherwise train.steps
        x n, and with replay the earlier targets share `replay_share` of the forget samples, the
        new ones the rest: each new target gets the samples it would get trained alone."""
        steps = self.cfg.train.steps
        if self.strategy == "joint":
            return steps * ((k + n) if self.cfg.continual.joint_steps_per_request else 1), None
        if not k:
            return steps * n, None
        share = self.cfg.continual.replay_share
        return steps * n, torch.tensor([share / k] * k + [(1.0 - share) / n] * n)

    def _together(self, todo: list[RequestRecord]) -> None:
        """Gate 0 for each new request, then one training over the earlier and the new requests
        (joint: from the base over every request along the lineage; anchored: on top of the serving
        weights, the done requests replayed); a new request that fails a gate is dropped (not
        forgotten: failed; integrity or a regression: the newest one goes back to pending) and the
        rest trained again from the batch's start, so the weights that ship were trained on exactly
        the requests that are recorded."""
        started = now_iso()
        new: list[tuple[RequestRecord, Path]] = []
        for rec in todo:
            self.keeper.check()
            try:
                new.append((rec, self._image(rec)))
            except (RequestError, NotFoundError, StorageError) as err:
                self.moves.fail(rec.id, f"its image cannot be used: {err}")
        if not new:
            return
        earlier, held = (self.earlier_specs, []) if self.strategy == "joint" else self._replayed_split()
        k = len(earlier)
        cfg = self._request_cfg([*earlier, *(TargetSpec(image=str(p), seed=r.seed, prompt=r.prompt) for r, p in new)])
        self._restore(self.start)
        active = []  # (request, target index, picture emb, base output emb, sscd_base, override)
        try:
            prep = engine.prepare(cfg, self.family, reference=self.ref, base=self.base)
            self._hold(prep, held)
            pictures = torch.stack([t.image for t in prep.targets[k:]]).cpu()
            emb = self.metrics.sscd_embed(torch.cat([pictures, prep.target_base[k:].cpu()]))
            n = len(new)
            for j, (rec, _) in enumerate(new):
                sscd_base = float(emb[j] @ emb[n + j])
                go, override = self._produced(rec, sscd_base)
                if go:
                    active.append((rec, k + j, emb[j], emb[n + j], sscd_base, override))
        except MetricUnavailable as err:
            raise BatchAborted(f"a metric the gates need is unavailable: {err}") from None
        except Exception as err:  # a model / numerical problem: every new request may be retried
            for rec, _ in new:
                self.moves.release_or_fail(rec, f"preparing the training together raised {type(err).__name__}: {err}")
            return
        finally:
            for _, path in new:
                path.unlink(missing_ok=True)
        while active:  # each round drops at least one request: at most len(new) rounds
            self.keeper.check()
            self._restore(self.start)
            index = [*range(k), *(a[1] for a in active)]
            steps, weights = self._together_plan(k, len(active))
            sub = replace(prep, targets=[prep.targets[i] for i in index], surrogates=prep.surrogates[index],
                          target_base=prep.target_base[index], forget_weights=weights,
                          cfg=prep.cfg.model_copy(update={"train": prep.cfg.train.model_copy(update={"steps": steps})}))
            sub.pull = self._pull(self.family)
            logger.info("%s: training %s on %d earlier + %d new request(s) together, %d steps", self.strategy,
                        "from the base" if self.strategy == "joint" else "on top of the serving weights",
                        k, len(active), steps)
            try:
                measured = self._train_and_measure(sub, [(a[0], len(index) - len(active) + j, a[2], a[3])
                                                         for j, a in enumerate(active)])
            except MetricUnavailable as err:
                raise BatchAborted(f"a metric the gates need is unavailable: {err}") from None
            except DivergedError as err:
                for a in active:
                    self.moves.fail(a[0].id, f"training {len(index)} request(s) together: {err}")
                break
            except Exception as err:
                for a in active:
                    self.moves.release_or_fail(a[0], f"training {len(active)} request(s) together raised "
                                                     f"{type(err).__name__}: {err}")
                break
            joint = {"earlier": k, "new": len(active), "steps": steps}
            verdicts = [self._verdict(a[0], m, a[4]) for a, m in zip(active, measured)]
            failed = [(a, reason, att) for a, (kind, reason, att, _) in zip(active, verdicts) if kind == "fail"]
            for a, reason, att in failed:
                self.moves.fail(a[0].id, reason, **att)
            if failed:
                active = [a for a in active if all(a is not f[0] for f in failed)]
                continue
            returned = [(a, reason, att) for a, (kind, reason, att, _) in zip(active, verdicts) if kind == "return"]
            if returned:  # integrity and regressions belong to the whole set: drop the newest request
                a, reason, att = returned[-1]
                rest = len(active) - 1
                self.moves.release_or_fail(a[0], reason + (f" (trained together with {len(active)} new request(s): "
                                                           f"it was dropped, the other {rest} trained again)"
                                                           if rest else ""), att)
                active = [x for x in active if x is not a]
                continue
            for a, m in zip(active, measured):
                m.joint = joint
                self._accept(a[0], m, a[4], started, a[5])
            return
        self._restore(self.start)  # nothing passed: the batch ships nothing

    def _accept(self, rec: RequestRecord, m: _Measured, sscd_base: float, started: str,
                override: dict | None) -> None:
        evidence = {
            "content_sha256": rec.content_sha256, "seed": rec.seed, "prompt": rec.prompt,
            "judged_by": "the model's output for the seed" if rec.seed is not None else "SDEdit of the picture at 0.5 T",
            "sscd_base": round(sscd_base, 4), "sscd_new": m.row["sscd_unlearned"], "artifact": m.row["artifact"],
            "hf_energy": m.row["hf_energy"], "artifact_bound": round(self.bound, 4),
            "threshold": self.threshold, "integrity_after_request": {
                "ssim": round(m.ssim, 4), "n": len(self.integrity_base), **({"prompts": m.prompts} if m.prompts else {})},
            "specificity": None if m.spec is None else {
                **{k: m.row.get(k) for k in ("sscd_base_hotfix", "rank", "margin", "specific")},
                **{k: m.spec[k] for k in ("n", "median", "p10", "percentile", "bound", "collateral", "max_collateral")}},
            "descriptor": m.descriptor, "settings": self._settings(), "train_seconds": round(m.train_s, 2),
            "steps_trained": m.steps, "weights_of_step": m.weights_of_step,
            "strategy": self.strategy,
            "times": {"claimed_at": rec.updated_at.isoformat(timespec="milliseconds"), "started_at": started,
                      "verified_at": now_iso()},
        }
        if override:
            evidence["produced_override"] = override
        if rec.id in self.tries:  # passed on a retry after the rest of the batch (continual.batch_retries)
            evidence["earlier_tries"] = self.tries[rec.id]
        if m.delta is not None:  # merge: stored at commit step 1
            evidence["delta"] = {"key": self._delta_key(rec.id), "sha256": None, "tensors": len(m.delta)}
            self.deltas[rec.id] = m.delta
        if self.strategy == "joint":  # later joint batches retrain it: from its seed, or they need its picture
            evidence["regenerated_from_seed"] = rec.seed is not None
            evidence["joint"] = m.joint
            if rec.seed is None and self.ctx.retention == "delete":
                logger.warning("%s has no seed and its picture will be purged (--retention delete): later joint "
                               "batches cannot retrain it and will stop; keep pictures or use another strategy", rec.id)
        elif m.joint is not None:  # trained together with the batch's other requests (continual.together)
            evidence["together"] = m.joint
        if rec.original_sha256:
            evidence["original_sha256"] = rec.original_sha256
        self.passed.append((rec, evidence))
        self.checks.append(m.check)
        # the weights now are the batch's final ones unless a later request passes (a failing one
        # is rolled back to exactly these): the commit's integrity figures reuse these samples
        self.integrity_last = m.integrity_new
        self.spec_last = m.spec

    def _settings(self) -> dict:
        c = self.cfg
        k = c.continual
        strategy = {"strategy": k.strategy, "remember_target": self.remember_target, "pull": k.pull,
                    "accept_margin": self.accept_margin}
        if k.strategy == "merge":
            strategy.update(merge_method=k.merge_method, ties_density=k.ties_density)
        if k.strategy == "anchored":
            strategy.update(replay=k.replay, **({"replay_as": k.replay_as, "replay_share": k.replay_share} if k.replay else {}),
                            **({"hold_margin": c.train.round_margin if k.hold_margin is None else k.hold_margin}
                               if k.replay and k.replay_as == "hold" else {}))
        if k.strategy == "joint":
            strategy.update(joint_steps_per_request=k.joint_steps_per_request)
        else:
            strategy.update(batch_retries=k.batch_retries, **({} if k.strategy == "merge" else {"together": k.together}))
        return {"method": c.method.name, "steps": c.train.steps, "lr": c.train.lr, "surrogate": c.surrogate.kind,
                "strength": c.surrogate.strength, "continual": strategy,
                "config_sha": content_hash(c.model_dump(mode="json"))}

    # ---- the batch: final check, then the commit steps in order ---------------------------------
    def _commit(self, elapsed: float) -> None:
        self.keeper.check()
        figures, rows = self._final_check()
        hotfix, config_key = self._upload()
        report = self._report(rows, figures, elapsed)
        tags, evidence = self._write_manifest(hotfix, config_key, report, figures, rows)
        self._checkpoint(evidence)
        if not self.ctx.lineage.decide_commit(self.id):
            raise BatchAborted(f"batch {self.id} was aborted by a processor that retook one of its requests")
        # ---- decided: from here on the batch is rolled forward, by us or by whoever comes next ----
        logger.info("commit 4/5: decided")
        if not self._take_lineage_lock():
            return
        self._register_and_complete(hotfix, tags, report, evidence)

    def _final_check(self) -> tuple[dict, list[dict]]:
        """Integrity of the final weights against the base, and every re-verification again."""
        cfg = self.cfg
        integrity_new = self.integrity_last  # the final weights' samples, taken by the last passed request
        figures = ev.integrity_figures(self.metrics, self.integrity_base, integrity_new, fid=cfg.eval.fid)
        figures.update(min_ssim=cfg.eval.min_integrity_ssim)
        figures["ok"] = figures["ssim"] is not None and figures["ssim"] >= cfg.eval.min_integrity_ssim
        if self.spec_last is not None:  # the last passed request's figures are the final weights' (vs the base)
            figures["collateral"] = self.spec_last["collateral"]
        if not figures["ok"]:
            figures["why"] = f"SSIM {figures['ssim']} below {cfg.eval.min_integrity_ssim}"
        if self.groups:  # each prompt apart again, on the final weights' samples (its gate as a request's)
            ev.integrity_by_prompt(cfg.eval, self.metrics, {
                "integrity": figures, "forget_threshold": self.threshold, "specificity": self.spec_last,
                "all_forgotten": True}, self.integrity_base, integrity_new, self.groups)
        rows = verify(self.family, self.metrics, self.checks, self.bound)
        self.out.integrity, self.out.reverified = figures, rows
        bad = regressions(rows)
        if not figures["ok"] or bad:
            raise BatchAborted(f"final integrity {figures.get('why')}" if not figures["ok"] else
                               "final re-verification: " + ", ".join(f"{r['id']} SSCD {r['sscd']}" for r in bad[:3]))
        self.n_ok = sum(r["forgotten"] is True for r in rows)
        logger.info("batch %s: integrity SSIM %s LPIPS %s FID %s on %s seeds; %d/%d requests verified forgotten",
                    self.id, figures["ssim"], figures["lpips"], figures["fid"], figures["n"], self.n_ok, len(rows))
        return figures, rows

    def _upload(self) -> tuple[str, str]:
        """Commit step 1: the hotfix (and the batch's settings) into the store."""
        from ray_unlearn.viz import integrity_grid

        store = self.ctx.store
        hotfix_key, config_key = f"hotfixes/{self.id}", f"batches/{self.id}/config.json"
        for rec, e in self.passed:  # merge: each request's delta, written once under this batch
            if "delta" in e:
                data = continual.save_delta(self.deltas[rec.id], {"request": rec.id, "batch": self.id,
                                                                  "base_model": self.cfg.model.path})
                store.put_bytes(e["delta"]["key"], data)
                e["delta"]["sha256"] = content_sha(data)
        integrity_grid(self.tmp / "integrity_grid.png", self.integrity_base, self.integrity_last)
        self.family.save(self.tmp / "hotfix")
        store.upload_dir(self.tmp / "hotfix", hotfix_key)
        store.put_json(config_key, self.cfg.model_dump(mode="json", exclude={"targets", "cache_dir"}))
        hotfix = store.uri(hotfix_key)
        logger.info("commit 1/5: hotfix uploaded to %s", hotfix)
        return hotfix, config_key

    def _write_manifest(self, hotfix: str, config_key: str, report: dict, figures: dict,
                        rows: list[dict]) -> tuple[dict, dict]:
        """Commit step 2: everything needed to finish the batch without this process."""
        from ray_unlearn.platform.tracking import version_tags

        ctx, cfg = self.ctx, self.cfg
        ids = [rec.id for rec, _ in self.passed]
        tags = version_tags(report, requests=",".join(ids), parent_version=self.parent, batch=self.id,
                            base_model=cfg.model.path, config_uri=ctx.store.uri(config_key),
                            manifest=ctx.store.uri(ctx.lineage.manifest_key(self.id)),
                            reverified=f"{self.n_ok}/{len(rows)}")
        integrity = {**{k: figures.get(k) for k in ("ssim", "lpips", "fid", "n", "collateral")}, "min": figures["min_ssim"]}
        if figures.get("prompts"):
            integrity["prompts"] = figures["prompts"]
        evidence = {}
        for rec, e in self.passed:
            final = next(r for r in rows if r["id"] == rec.id)
            evidence[rec.id] = {**e, "batch": self.id, "parent": self.parent, "hotfix": hotfix,
                                "sscd_final": final["sscd"], "integrity": integrity,
                                "versions": {"parent": self.parent, "base_model": cfg.model.path,
                                             "model_name": ctx.registry.name}}
        ctx.lineage.write_manifest(self.id, {
            "batch": self.id, "parent": self.parent, "hotfix": hotfix, "requests": ids, "evidence": evidence,
            "tags": tags, "run_id": self.run_id, "holder": ctx.holder, "created_at": now_iso(),
            "config": config_key, "integrity": figures, "reverified": rows,
            "brought_back": sorted(self.brought_back)})
        logger.info("commit 2/5: manifest written")
        return tags, evidence

    def _checkpoint(self, evidence: dict) -> None:
        """Commit step 3: each request checkpointed with the batch, fenced by its lease (a
        LeaseLost means someone else may hold it: do not commit)."""
        for rid in evidence:
            self.keeper.check()
            try:
                self.ctx.queue.checkpoint(rid, self.ctx.holder, evidence[rid])
            except LeaseLost as err:
                raise BatchAborted(str(err)) from None
        self.keeper.check()
        logger.info("commit 3/5: %d request(s) checkpointed with the batch", len(evidence))

    def _take_lineage_lock(self) -> bool:
        """Commit step 5, the commit point: this batch becomes its parent's one successor, or
        another batch already is and these requests go back to pending."""
        lineage = self.ctx.lineage
        if lineage.take_lock(self.parent, self.id):
            logger.info("commit 5/5: batch %s is the successor of %s", self.id, self.parent)
            return True
        winner = lineage.successor(self.parent)
        self.out.status = "returned"
        self.out.message = f"batch {winner} was applied on {self.parent} first; these requests will be redone on top"
        logger.warning(self.out.message)
        for rec, _ in self.passed:
            self.moves.release(rec.id, f"lost the lineage race on {self.parent} to {winner}")
        self._end_run("FAILED")
        return False

    def _register_and_complete(self, hotfix: str, tags: dict, report: dict, evidence: dict) -> None:
        """After the commit point: register, move the alias, complete each request."""
        ctx = self.ctx
        try:
            self.tracker.log_report(self.run_id, report, out_dir=self.tmp, storage_uri=hotfix)
        except Exception as err:
            logger.warning("MLflow logging failed (%s); the registry and the store hold the evidence", err)
        version = ctx.registry.register(hotfix, run_id=self.run_id, tags=tags, idempotency_key=self.id)
        ctx.lineage.advance()
        self.out.version, self.out.status = version.version, "promoted"
        self.out.message = f"version {version.version} (on {self.parent}) serves; {len(evidence)} request(s) applied"
        for rec, _ in self.passed:
            self.moves.complete(rec.id, evidence[rec.id], version.version)
        self._end_run("FINISHED")

    def _report(self, rows: list[dict], figures: dict, elapsed: float) -> dict:
        """The batch as an engine-style report (what `version_tags` and MLflow read): no
        descriptors, no pictures."""
        targets = [{"id": rec.id, "content_sha256": e["content_sha256"], "seed": e["seed"],
                    "sscd_base": e["sscd_base"], "sscd_unlearned": e["sscd_new"], "artifact": e["artifact"],
                    "forgotten": True} for rec, e in self.passed]
        return {"method": self.cfg.method.name, "config": self.cfg.model_dump(mode="json", exclude={"targets"}),
                "batch": self.id, "parent_version": self.parent, "targets": targets,
                "forget_threshold": self.threshold, "integrity": figures,
                "all_forgotten": all(r["forgotten"] is not False for r in rows),
                "passed": figures["ok"] and not regressions(rows), "reverified": rows,
                "requests": self.out.requests, "steps": self.cfg.train.steps, "wall_seconds": round(elapsed, 2)}
