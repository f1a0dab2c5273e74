"""One batch: sequential unlearning of the claimed requests, the gates, and the commit.

Run by `ray_unlearn.requests.process.Processor` (see its docstring for the gates and the order of
the commit steps, and `lineage` for why each step is safe to crash after). A batch gets what it
needs passed in (`BatchContext`, the queue transitions, the lease keeper, its settings) and
writes to the local disk only in its scratch directory.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ray_unlearn import engine
from ray_unlearn import evaluate as ev
from ray_unlearn.config import TargetSpec
from ray_unlearn.data import ImageError, decode_image
from ray_unlearn.hashing import content_hash
from ray_unlearn.loop import DivergedError
from ray_unlearn.metrics import MetricUnavailable
from ray_unlearn.requests.common import (
    REQUESTS_EXPERIMENT, BatchAborted, BatchContext, Outcome, Transitions, now_iso,
)
from ray_unlearn.requests.evidence import (
    Check, check_from_evidence, decode_descriptor, encode_descriptor, judge_checks, outputs_for, regressions, verify,
)
from ray_unlearn.requests.images import normalise_image
from ray_unlearn.requests.lease import LeaseKeeper
from ray_unlearn.requests.lineage import parent_key
from ray_unlearn.requests.models import LeaseLost, RequestError, RequestRecord, screen_prompts
from ray_unlearn.storage import NotFoundError, StorageError, materialize

logger = logging.getLogger(__name__)

NOT_PRODUCED = "this model does not generate this image: nothing to remove"


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

    # ---- settings and models --------------------------------------------------------------------
    def _load(self) -> None:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # our own per-request lines say where we are
        cfg = self.cfg
        self.base = engine.load_family(cfg, lora=False)
        source = self.serving.source if self.serving else None
        # the engine loads local paths only: a hotfix in the store is copied here first (once per machine)
        local = str(materialize(source, Path(cfg.cache_dir).expanduser() / "models")) if source else None
        self.family = engine.load_family(cfg, model_path=local)
        logger.info("model: %s %r; method %s, %d steps per request",
                    f"version {self.serving.version} ({source})" if source else "the base model",
                    cfg.model.path, cfg.method.name, cfg.train.steps)
        self.ref = engine.reference_outputs(cfg, self.base, progress=False)  # cached after the first batch
        self.seeds = ev.integrity_seeds(cfg.eval)
        self.integrity_base = self.ref.integrity_base[: len(self.seeds)]
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
                evidence.update(ctx.lineage.manifest(batch)["evidence"])
        records = {rec.id: rec for rec in ctx.queue.list("done")}
        evidence.update({rid: rec.evidence for rid, rec in records.items()})
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
                rows = verify(self.family, self.metrics, self.checks, self.bound)
                bad = regressions(rows)
                if bad:
                    raise BatchAborted(
                        f"the serving model does not forget {len(bad)} request(s) already done ("
                        + ", ".join(f"{r['id']}: SSCD {r['sscd']:.3f} >= {r['threshold']:.3f}" for r in bad[:3])
                        + "): it does not descend from the versions that applied them; restore the alias")
                logger.info("%d earlier request(s) checked on the serving model: still forgotten", len(rows))
        except MetricUnavailable as err:
            raise BatchAborted(f"a metric the gates need is unavailable: {err}") from None
        self._start_run()
        try:
            for i, rec in enumerate(todo, 1):
                self.keeper.check()
                logger.info("[%d/%d] %s (seed %s, attempt %d)", i, len(todo), rec.id, rec.seed, rec.attempts)
                self._one(rec)
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

    # ---- one request ----------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.family.model.named_parameters() if p.requires_grad}

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.family.model.named_parameters():
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

    def _one(self, rec: RequestRecord) -> None:
        started = now_iso()
        try:
            path = self._image(rec)
        except (RequestError, NotFoundError, StorageError) as err:
            self.moves.fail(rec.id, f"its image cannot be used: {err}")
            return
        cfg = self.cfg.model_copy(update={"targets": [TargetSpec(image=str(path), seed=rec.seed, prompt=rec.prompt)]})
        snap = self._snapshot()
        try:
            prep = engine.prepare(cfg, self.family, reference=self.ref, base=self.base)
            emb = self.metrics.sscd_embed(torch.cat([prep.targets[0].image[None].cpu(), prep.target_base.cpu()]))
            sscd_base = float(emb[0] @ emb[1])
            go, override = self._produced(rec, sscd_base)
            if not go:
                return
            measured = self._train_and_measure(prep, emb[0], rec, emb[1])
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
        if self._gates(rec, measured, sscd_base, snap):
            self._accept(rec, measured, sscd_base, started, override)

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

    def _train_and_measure(self, prep, picture_emb: torch.Tensor, rec: RequestRecord,
                           base_out_emb: torch.Tensor) -> _Measured:
        fam = self.family
        t = time.perf_counter()
        engine.train(prep, progress=False)
        train_s = time.perf_counter() - t
        new = ev.model_outputs_for_targets(fam, prep.targets)
        if not bool(torch.isfinite(new).all()):
            raise DivergedError(prep.cfg.train.steps, "NaN", "the model's output for the picture", "after training")
        earlier, judged = outputs_for(fam, self.checks)
        # one SSCD pass: the new model's output for the picture, and the re-checks
        emb = self.metrics.sscd_embed(torch.cat([new.cpu()] + ([earlier.cpu()] if judged else [])))
        self.sscd_source = self.metrics.sources().get("sscd", "sscd")
        sscd_new, hf = float(picture_emb @ emb[0]), float(ev.high_frequency_energy(new)[0])
        integrity_new = fam.generate(fam.initial_noise(self.seeds))
        # specificity: the picture's output must have moved more than the unrelated outputs did
        shift = ev.unrelated_shift(self.metrics, self.integrity_base, integrity_new, self.integrity_emb)
        spec = ev.specificity_figures(self.cfg.eval, shift, self.threshold["value"])
        target = ev.target_specificity(float(base_out_emb @ emb[0]), spec)
        forgotten, why = ev.target_verdict(sscd_new < self.threshold["value"], hf > self.bound, target["specific"])
        row = {"sscd_unlearned": round(sscd_new, 4), "hf_energy": round(hf, 4), "artifact": hf > self.bound,
               **target, "forgotten": forgotten, "why": why}
        rows = judge_checks(self.checks, judged, earlier, emb[1:], self.bound)
        ssim = float(self.metrics.ssim(self.integrity_base, integrity_new).mean())
        gate = ev.integrity_gate(self.cfg.eval, {"ssim": round(ssim, 4)}, spec)
        descriptor = encode_descriptor(picture_emb, self.sscd_source)
        check = Check(rec.id, rec.seed, decode_descriptor(descriptor), self.threshold["value"],
                      prep.targets[0].image if rec.seed is None else None)
        return _Measured(row, rows, ssim, integrity_new, check, descriptor, train_s, spec, gate)

    def _gates(self, rec: RequestRecord, m: _Measured, sscd_base: float, snap) -> bool:
        """Gates 1-3 on the request's figures; a failed one restores the snapshot and moves the request."""
        min_ssim = self.cfg.eval.min_integrity_ssim
        figures = f"SSCD {sscd_base:.3f} -> {m.row['sscd_unlearned']:.3f} (threshold {self.threshold['value']:.3f})"
        logger.info("  %s, integrity SSIM %.3f (bound %s), %d earlier re-verified, %.0f s training",
                    figures, m.ssim, min_ssim, len(m.rows), m.train_s)
        attempt = {"sscd_base": round(sscd_base, 4), "sscd_new": m.row["sscd_unlearned"],
                   "integrity_ssim": round(m.ssim, 4), "prompt": rec.prompt}
        if not m.row["forgotten"]:
            self._restore(snap)
            self.moves.fail(rec.id, f"not forgotten with these settings: {figures}; {m.row['why']}", **attempt)
            return False
        if m.ssim < min_ssim:
            self._restore(snap)
            self.moves.release_or_fail(rec, f"integrity gate: unlearning it would leave SSIM {m.ssim:.3f} "
                                       f"against the base, below the bound {min_ssim}", attempt)
            return False
        if m.gate is not None and not m.gate["ok"]:  # collateral forgetting (evaluate.integrity_gate)
            self._restore(snap)
            self.moves.release_or_fail(rec, f"integrity gate: {m.gate['why']}", attempt)
            return False
        bad = regressions(m.rows)
        if bad:
            self._restore(snap)
            self.moves.release_or_fail(rec, "unlearning it brought back " + ", ".join(
                f"{r['id']} (SSCD {r['sscd']:.3f} >= {r['threshold']:.3f})" for r in bad[:3]), attempt)
            return False
        return True

    def _accept(self, rec: RequestRecord, m: _Measured, sscd_base: float, started: str,
                override: dict | None) -> None:
        evidence = {
            "content_sha256": rec.content_sha256, "seed": rec.seed, "prompt": rec.prompt,
            "judged_by": "the model's output for the seed" if rec.seed is not None else "SDEdit of the picture at 0.5 T",
            "sscd_base": round(sscd_base, 4), "sscd_new": m.row["sscd_unlearned"], "artifact": m.row["artifact"],
            "hf_energy": m.row["hf_energy"], "artifact_bound": round(self.bound, 4),
            "threshold": self.threshold, "integrity_after_request": {"ssim": round(m.ssim, 4), "n": len(self.seeds)},
            "specificity": None if m.spec is None else {
                **{k: m.row.get(k) for k in ("sscd_base_hotfix", "rank", "margin", "specific")},
                **{k: m.spec[k] for k in ("n", "median", "p10", "percentile", "bound", "collateral", "max_collateral")}},
            "descriptor": m.descriptor, "settings": self._settings(), "train_seconds": round(m.train_s, 2),
            "times": {"claimed_at": rec.updated_at.isoformat(timespec="milliseconds"), "started_at": started,
                      "verified_at": now_iso()},
        }
        if override:
            evidence["produced_override"] = override
        if rec.original_sha256:
            evidence["original_sha256"] = rec.original_sha256
        self.passed.append((rec, evidence))
        self.checks.append(m.check)
        # the weights now are the batch's final ones unless a later request passes (a failing one
        # is rolled back to exactly these): the commit's integrity figures reuse these samples
        self.integrity_last = m.integrity_new

    def _settings(self) -> dict:
        c = self.cfg
        return {"method": c.method.name, "steps": c.train.steps, "lr": c.train.lr, "surrogate": c.surrogate.kind,
                "strength": c.surrogate.strength, "config_sha": content_hash(c.model_dump(mode="json"))}

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
        rows = verify(self.family, self.metrics, self.checks, self.bound)
        self.out.integrity, self.out.reverified = figures, rows
        bad = regressions(rows)
        if not figures["ok"] or bad:
            raise BatchAborted(f"final integrity SSIM {figures['ssim']} below {cfg.eval.min_integrity_ssim}"
                               if not figures["ok"] else
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
        integrity = {**{k: figures.get(k) for k in ("ssim", "lpips", "fid", "n")}, "min": figures["min_ssim"]}
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
            "config": config_key, "integrity": figures, "reverified": rows})
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
