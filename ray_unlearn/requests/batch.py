"""One batch: sequential unlearning of the claimed requests, the gates, and the commit.

Driven by `ray_unlearn.requests.process.Processor` (see its docstring for the gates and the
order of the commit steps, and `lineage` for why each step is safe to crash after).
"""

from __future__ import annotations

import io
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ray_unlearn import engine
from ray_unlearn import evaluate as ev
from ray_unlearn.config import TargetSpec
from ray_unlearn.hashing import content_hash
from ray_unlearn.metrics import MetricUnavailable
from ray_unlearn.requests.evidence import (
    Check, check_from_evidence, decode_descriptor, encode_descriptor, judge_checks, outputs_for, regressions, verify,
)
from ray_unlearn.requests.images import normalise_image
from ray_unlearn.requests.lineage import parent_key
from ray_unlearn.requests.models import LeaseLost, RequestError, RequestRecord
from ray_unlearn.requests.process import REQUESTS_EXPERIMENT, BatchAborted, Outcome, _now
from ray_unlearn.storage import NotFoundError, StorageError


def _picture(png: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(png)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class Batch:
    def __init__(self, proc, keeper, serving, cfg, out: Outcome):
        self.p, self.keeper, self.serving, self.cfg, self.out = proc, keeper, serving, cfg, out
        self.parent = parent_key(serving)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.id = f"batch-{stamp}-{uuid.uuid4().hex[:8]}"
        out.batch, out.parent = self.id, self.parent
        self.log = proc.log
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
        self.family = engine.load_family(cfg, model_path=source)
        self.log(f"model: {'version ' + str(self.serving.version) + ' (' + source + ')' if source else 'the base model'}"
                 f" {cfg.model.path!r}; method {cfg.method.name}, {cfg.train.steps} steps per request")
        self.ref = engine.reference_outputs(cfg, self.base, progress=False)  # cached after the first batch
        self.seeds = ev.integrity_seeds(cfg.eval)
        self.integrity_base = self.ref.integrity_base[: len(self.seeds)]
        self.metrics = engine.build_metrics(cfg, self.family.device)
        self.threshold = ev.calibrate_threshold(cfg.eval, self.metrics, self.ref.remember)
        self.reference_hf = float(ev.high_frequency_energy(self.integrity_base).max())
        self.bound = ev.ARTIFACT_FACTOR * self.reference_hf

    def _earlier_checks(self) -> list[Check]:
        """Everything the serving model must keep forgotten: the done requests, and the requests
        of committed batches along the lineage that are not completed yet (their processor died
        after the commit; they will be completed from the manifest, so they must not regress)."""
        evidence: dict[str, dict] = {}
        for v in self.p.lineage.chain():
            batch = v.tags.get("batch")
            if batch:
                evidence.update(self.p.lineage.manifest(batch)["evidence"])
        records = {rec.id: rec for rec in self.p.queue.list("done")}
        evidence.update({rid: rec.evidence for rid, rec in records.items()})
        checks = []
        for rid, ev_ in sorted(evidence.items()):
            image, rec = None, records.get(rid)
            if ev_.get("seed") is None and (rec is None or rec.image_key is not None):
                try:  # a seedless request is judged from its picture while the picture is kept
                    image = self.family.prepare_images(_picture(self.p.queue.read_image(rid))[None])[0].cpu()
                except (RequestError, NotFoundError, OSError):
                    image = None
            c = check_from_evidence(rid, ev_, image)
            if c is not None:
                checks.append(c)
        return checks

    # ---- the run --------------------------------------------------------------------------------
    def run(self, todo: list[RequestRecord]) -> None:
        t0 = time.perf_counter()
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
                self.log(f"{len(rows)} earlier request(s) checked on the serving model: still forgotten")
        except MetricUnavailable as err:
            raise BatchAborted(f"a metric the gates need is unavailable: {err}") from None
        self._start_run()
        try:
            with tempfile.TemporaryDirectory(prefix="ray-unlearn-batch-") as tmp:
                self.tmp = Path(tmp)
                for i, rec in enumerate(todo, 1):
                    self.keeper.check()
                    self.log(f"[{i}/{len(todo)}] {rec.id} (seed {rec.seed}, attempt {rec.attempts})")
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

        self.tracker = Tracker(self.p.tracking_uri, experiment=REQUESTS_EXPERIMENT)
        params = {**self.cfg.model_dump(mode="json", exclude={"targets", "cache_dir"}),
                  "batch": {"id": self.id, "parent": self.parent, "limit": self.p.limit, "retention": self.p.retention}}
        self.run_id = self.tracker.start_run(self.id, params=params, tags={
            "batch": self.id, "parent_version": self.parent, "holder": self.p.holder, "model_name": self.p.registry.name})

    def _end_run(self, status: str) -> None:
        if self.run_id is not None:
            try:
                self.tracker.end_run(self.run_id, status)
            except Exception as err:  # tracking is evidence, not the protocol: never mask the real outcome
                self.log(f"warning: could not end MLflow run {self.run_id}: {err}")
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
        """The request's picture, checked again (storage may have changed since submit)."""
        data = self.p.queue.read_image(rec.id)
        q = self.p.queue
        img = normalise_image(data, max_bytes=q.max_bytes, max_pixels=q.max_pixels, allowed_formats=q.allowed_formats)
        if img.sha256 != rec.content_sha256:
            raise RequestError(f"the stored image is not the submitted picture (sha256 {img.sha256[:12]}... != "
                               f"{rec.content_sha256[:12]}...): it was altered or corrupted in storage")
        path = self.tmp / f"{rec.id}.png"
        path.write_bytes(img.png)
        return path

    def _one(self, rec: RequestRecord) -> None:
        started = _now()
        try:
            path = self._image(rec)
        except (RequestError, NotFoundError, StorageError) as err:
            self.p._fail(self.keeper, rec.id, f"its image cannot be used: {err}", self.out)
            return
        cfg = self.cfg.model_copy(update={"targets": [TargetSpec(image=str(path), seed=rec.seed)]})
        snap = self._snapshot()
        fam = self.family
        try:
            t = time.perf_counter()
            prep = engine.prepare(cfg, fam, reference=self.ref, base=self.base)
            engine.train(prep, progress=False)
            train_s = time.perf_counter() - t
            target = prep.targets[0]
            new = ev.model_outputs_for_targets(fam, prep.targets)
            earlier, judged = outputs_for(fam, self.checks)
            # one SSCD pass: the picture, the base's and the new model's output for it, the re-checks
            parts = [target.image[None], prep.target_base, new] + ([earlier] if judged else [])
            emb = self.metrics.sscd_embed(torch.cat([x.cpu() for x in parts]))
            self.sscd_source = self.metrics.sources().get("sscd", "sscd")
            sscd_base, sscd_new = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
            hf = float(ev.high_frequency_energy(new)[0])
            # the rule of evaluate.judge_targets, on embeddings already computed
            row = {"sscd_base": round(sscd_base, 4), "sscd_unlearned": round(sscd_new, 4), "hf_energy": round(hf, 4),
                   "artifact": hf > self.bound, "forgotten": sscd_new < self.threshold["value"] and hf <= self.bound}
            rows = judge_checks(self.checks, judged, earlier, emb[3:], self.bound)
            integrity_new = fam.generate(fam.initial_noise(self.seeds))
            ssim = float(self.metrics.ssim(self.integrity_base, integrity_new).mean())
            descriptor = encode_descriptor(emb[0], self.sscd_source)
            check = Check(rec.id, rec.seed, decode_descriptor(descriptor), self.threshold["value"],
                          target.image if rec.seed is None else None)
        except MetricUnavailable as err:
            self._restore(snap)
            raise BatchAborted(f"a metric the gates need is unavailable: {err}") from None
        except Exception as err:  # a model / numerical problem with this request: it may be retried
            self._restore(snap)
            self.p.release_or_fail(self.keeper, rec, f"unlearning it raised {type(err).__name__}: {err}", self.out)
            return
        figures = f"SSCD {row['sscd_base']:.3f} -> {row['sscd_unlearned']:.3f} (threshold {self.threshold['value']:.3f})"
        lines = [f"  {figures}, integrity SSIM {ssim:.3f} (bound {cfg.eval.min_integrity_ssim}), "
                 f"{len(rows)} earlier re-verified, {train_s:.0f} s training"]
        self.log(lines[0])
        attempt = {"sscd_base": row["sscd_base"], "sscd_new": row["sscd_unlearned"], "integrity_ssim": round(ssim, 4)}
        if not row["forgotten"]:
            self._restore(snap)
            why = "its output is artifact texture, not a new image" if row["artifact"] else "SSCD is not below the threshold"
            self.p._fail(self.keeper, rec.id, f"not forgotten with these settings: {figures}; {why}", self.out, **attempt)
            return
        if ssim < cfg.eval.min_integrity_ssim:
            self._restore(snap)
            self.p.release_or_fail(self.keeper, rec, f"integrity gate: unlearning it would leave SSIM {ssim:.3f} "
                                   f"against the base, below the bound {cfg.eval.min_integrity_ssim}", self.out, attempt)
            return
        bad = regressions(rows)
        if bad:
            self._restore(snap)
            self.p.release_or_fail(self.keeper, rec, "unlearning it brought back " + ", ".join(
                f"{r['id']} (SSCD {r['sscd']:.3f} >= {r['threshold']:.3f})" for r in bad[:3]), self.out, attempt)
            return
        evidence = {
            "content_sha256": rec.content_sha256, "seed": rec.seed,
            "judged_by": "the model's output for the seed" if rec.seed is not None else "SDEdit of the picture at 0.5 T",
            "sscd_base": row["sscd_base"], "sscd_new": row["sscd_unlearned"], "artifact": row["artifact"],
            "hf_energy": row["hf_energy"], "artifact_bound": round(self.bound, 4),
            "threshold": self.threshold, "integrity_after_request": {"ssim": round(ssim, 4), "n": len(self.seeds)},
            "descriptor": descriptor, "settings": self._settings(), "train_seconds": round(train_s, 2),
            "times": {"claimed_at": rec.updated_at.isoformat(timespec="milliseconds"), "started_at": started,
                      "verified_at": _now()},
        }
        self.passed.append((rec, evidence))
        self.checks.append(check)
        # the weights now are the batch's final ones unless a later request passes (a failing one
        # is rolled back to exactly these): the commit's integrity figures reuse these samples
        self.integrity_last = integrity_new

    def _settings(self) -> dict:
        c = self.cfg
        return {"method": c.method.name, "steps": c.train.steps, "lr": c.train.lr, "surrogate": c.surrogate.kind,
                "strength": c.surrogate.strength, "config_sha": content_hash(c.model_dump(mode="json"))}

    # ---- the batch ------------------------------------------------------------------------------
    def _commit(self, elapsed: float) -> None:
        p, fam, cfg = self.p, self.family, self.cfg
        self.keeper.check()
        integrity_new = self.integrity_last  # the final weights' samples, taken by the last passed request
        figures = ev.integrity_figures(self.metrics, self.integrity_base, integrity_new, fid=cfg.eval.fid)
        figures.update(min_ssim=cfg.eval.min_integrity_ssim)
        figures["ok"] = figures["ssim"] is not None and figures["ssim"] >= cfg.eval.min_integrity_ssim
        rows = verify(fam, self.metrics, self.checks, self.bound)
        self.out.integrity, self.out.reverified = figures, rows
        ids = [rec.id for rec, _ in self.passed]
        bad = regressions(rows)
        if not figures["ok"] or bad:
            why = (f"final integrity SSIM {figures['ssim']} below {cfg.eval.min_integrity_ssim}" if not figures["ok"]
                   else "final re-verification: " + ", ".join(f"{r['id']} SSCD {r['sscd']}" for r in bad[:3]))
            raise BatchAborted(why)
        n_ok = sum(r["forgotten"] is True for r in rows)
        self.log(f"batch {self.id}: integrity SSIM {figures['ssim']} LPIPS {figures['lpips']} FID {figures['fid']} "
                 f"on {figures['n']} seeds; {n_ok}/{len(rows)} requests verified forgotten")
        store = p.store
        hotfix_key, config_key = f"hotfixes/{self.id}", f"batches/{self.id}/config.json"
        grid = self.tmp / "integrity_grid.png"
        from ray_unlearn.viz import integrity_grid

        integrity_grid(grid, self.integrity_base, integrity_new)
        fam.save(self.tmp / "hotfix")
        store.upload_dir(self.tmp / "hotfix", hotfix_key)
        hotfix = store.uri(hotfix_key)
        store.put_json(config_key, cfg.model_dump(mode="json", exclude={"targets", "cache_dir"}))
        self.log(f"commit 1/5: hotfix uploaded to {hotfix}")
        report = self._report(rows, figures, elapsed)
        from ray_unlearn.platform.tracking import version_tags

        tags = version_tags(report, requests=",".join(ids), parent_version=self.parent, batch=self.id,
                            base_model=cfg.model.path, config_uri=store.uri(config_key),
                            manifest=store.uri(p.lineage.manifest_key(self.id)),
                            reverified=f"{n_ok}/{len(rows)}")
        integrity = {**{k: figures.get(k) for k in ("ssim", "lpips", "fid", "n")}, "min": figures["min_ssim"]}
        evidence = {}
        for rec, e in self.passed:
            final = next(r for r in rows if r["id"] == rec.id)
            evidence[rec.id] = {**e, "batch": self.id, "parent": self.parent, "hotfix": hotfix,
                                "sscd_final": final["sscd"], "integrity": integrity,
                                "versions": {"parent": self.parent, "base_model": cfg.model.path,
                                             "model_name": p.registry.name}}
        p.lineage.write_manifest(self.id, {
            "batch": self.id, "parent": self.parent, "hotfix": hotfix, "requests": ids, "evidence": evidence,
            "tags": tags, "run_id": self.run_id, "holder": p.holder, "created_at": _now(), "config": config_key,
            "integrity": figures, "reverified": rows})
        self.log("commit 2/5: manifest written")
        for rid in ids:  # fenced: a LeaseLost here means someone else may hold it: do not commit
            self.keeper.check()
            try:
                p.queue.checkpoint(rid, p.holder, evidence[rid])
            except LeaseLost as err:
                raise BatchAborted(str(err)) from None
        self.keeper.check()
        self.log(f"commit 3/5: {len(ids)} request(s) checkpointed with the batch")
        if not p.lineage.decide_commit(self.id):
            raise BatchAborted(f"batch {self.id} was aborted by a processor that retook one of its requests")
        # ---- decided: from here on the batch is rolled forward, by us or by whoever comes next ----
        self.log("commit 4/5: decided")
        if not p.lineage.take_lock(self.parent, self.id):
            winner = p.lineage.successor(self.parent)
            self.out.status = "returned"
            self.out.message = f"batch {winner} was applied on {self.parent} first; these requests will be redone on top"
            self.log(self.out.message)
            for rec, _ in self.passed:
                p._release(self.keeper, rec.id, self.out, f"lost the lineage race on {self.parent} to {winner}")
            self._end_run("FAILED")
            return
        self.log(f"commit 5/5: batch {self.id} is the successor of {self.parent}")
        try:
            self.tracker.log_report(self.run_id, report, out_dir=self.tmp, storage_uri=hotfix)
        except Exception as err:
            self.log(f"warning: MLflow logging failed ({err}); the registry and the store hold the evidence")
        version = p.registry.register(hotfix, run_id=self.run_id, tags=tags, idempotency_key=self.id)
        p.lineage.advance(self.log)
        self.out.version, self.out.status = version.version, "promoted"
        self.out.message = f"version {version.version} (on {self.parent}) serves; {len(ids)} request(s) applied"
        for rec, _ in self.passed:
            p.complete(self.keeper, rec.id, evidence[rec.id], version.version, self.out)
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
