"""The main job on embedded defaults: a deletion request, a Pareto search, a promoted hotfix.

Everything lives under one folder (default runs/demo): the object store (store/), MLflow's SQLite
store (mlflow.db) and its artifacts (mlartifacts/), pareto.json / pareto.png. Local Ray, the
shipped demo model, no network.

The request is the queue's like any other: the demo claims it by id before the search (so that
no `requests process` takes it meanwhile; its lease is renewed while the search runs) and ends it
afterwards. A promoted hotfix completes it (`done`), its evidence in the shape of a batch's, built
from the chosen trial's report, so later batches re-verify it from its descriptor and seed. A
search that found no setting within the gates, or whose choice the promotion policy refused,
fails it with the figures of every trial (`requests requeue` tries again). A search that raised
returns it to pending with the reason. A request already done, failed or held by another
processor is left as it is (the summary says so).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from ray_unlearn.config import load_config
from ray_unlearn.data import load_image, save_image
from ray_unlearn.engine import build_metrics, load_family
from ray_unlearn.hashing import content_hash
from ray_unlearn.platform.cluster import init_ray
from ray_unlearn.platform.models import with_local_model
from ray_unlearn.platform.search import SearchOptions, run_search
from ray_unlearn.platform.promotion import PromotionRefused
from ray_unlearn.platform.registry import Registry
from ray_unlearn.requests.common import make_holder
from ray_unlearn.requests.evidence import encode_descriptor
from ray_unlearn.requests.lease import LeaseKeeper
from ray_unlearn.requests.lineage import BASE
from ray_unlearn.requests.models import BatchAborted, LeaseLost, RequestRecord, now_iso
from ray_unlearn.requests.queue import Queue
from ray_unlearn.storage import open_store

logger = logging.getLogger(__name__)

DEMO_SEED = 7  # the demo model's output for seed 7 is "the face" a user asks to remove


def run_demo(out: str | Path = "runs/demo", trials: int = 6, space: str = "demo", seed: int = DEMO_SEED,
             proxy_integrity: int = 16, progress: bool = True, sets: list[str] = (), family: str = "ddpm") -> dict:
    """`family="sd3"`: the flag model instead; its card's wrong flag (prompt and seed) is the request,
    the correct flag drawn by code its surrogate, search_spaces/sd3.yaml the search."""
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    store_uri = str(root / "store")
    tracking = f"sqlite:///{root / 'mlflow.db'}"

    base, prompt, note = {}, None, "demo: 'your model generates my face: remove it'"
    if family == "sd3":
        from ray_unlearn.families.sd3_demo import demo_run_values

        base = demo_run_values(root / "sd3")
        target = base.pop("targets")[0]
        seed, prompt = target["seed"], target["prompt"]
        base["model.sd3.prompt"] = prompt
        note = f"demo: '{prompt}' draws the wrong flag for seed {seed}: fix it"
        space = "sd3" if space == "demo" else space
    elif family != "ddpm":
        raise ValueError(f"unknown demo family '{family}'; choose ddpm (the faces model) or sd3 (the flag model)")

    # 1. the request, as a user sends it: a picture the model made (and its seed, from the service's logs)
    png = root / "request.png"
    if not png.is_file():
        base_cfg = with_local_model(load_config(None, list(sets), base=base))
        fam = load_family(base_cfg, lora=False)
        save_image(fam.generate(fam.initial_noise([seed]))[0], png)
    queue = Queue(open_store(store_uri))
    record, new = queue.submit(png, seed=seed, note=note, prompt=prompt)  # sd3: the request names its prompt
    logger.info("deletion request %s (%s): the demo model's output for seed %d", record.id,
                "new" if new else "already queued", seed)
    holder = "demo-" + make_holder()
    claimed = queue.claim_ids(holder, [record.id])
    if not claimed:
        record = queue.get(record.id)
        logger.warning("deletion request %s is %s%s: this run leaves it as it is", record.id, record.state,
                       f" (held by {record.lease_holder})" if record.state == "claimed" else
                       " (`ray-unlearn requests requeue` it to try again)" if record.state == "failed" else "")
    keeper = LeaseKeeper(queue, holder, [record.id], queue.lease.total_seconds() / 3) if claimed else None

    # 2. the search for the settings that forget it while changing the model least
    target = {"image": str(png), "seed": seed, **({"prompt": prompt} if prompt else {})}
    cfg = load_config(None, list(sets), base={**base, "targets": [target]})
    started = now_iso()
    try:
        init_ray(num_cpus=os.cpu_count())
        opts = SearchOptions(space=space, trials=trials, storage=store_uri, tracking_uri=tracking,
                             proxy_integrity=proxy_integrity, out_dir=str(root))
        summary = run_search(cfg, opts, progress=progress)
        logger.info("search done: %d trials, %d on the front", len(summary["trials"]), len(summary["front"]))

        # 3. the hotfix to ship: the most intact front point within the integrity bound
        promoted, refused = None, None
        if summary["chosen"]:
            try:
                if keeper is not None:
                    keeper.check()  # a lost lease: another processor works on the request; ship nothing
                promoted = Registry(tracking).promote(summary["chosen"]["version"]).version
            except (PromotionRefused, BatchAborted) as err:
                refused = str(err)
    except BaseException as err:
        if keeper is not None:
            keeper.stop()
            _release(queue, holder, record.id, f"the demo's search raised {type(err).__name__}: {err}")
        raise
    if keeper is not None:
        keeper.stop()
        record = _close(queue, holder, claimed[0], summary, cfg, png, promoted, refused, tracking, started)
    summary.update({"request": record.id, "request_new": new, "request_state": record.state,
                    "request_reason": record.reason, "promoted_version": promoted, "promotion_refused": refused,
                    "mlflow_ui": f"mlflow ui --backend-store-uri {tracking} --port 5000",
                    "out_dir": str(root)})
    return summary


# ---- the request's end ------------------------------------------------------------------------------

def _release(queue: Queue, holder: str, rid: str, reason: str) -> None:
    """Back to pending, the reason on the record (as a batch returns a request it could not finish)."""
    try:
        queue.checkpoint(rid, holder, {"last_attempt": {"holder": holder, "at": now_iso(), "reason": reason[:1500]}})
        queue.release(rid, holder)
        logger.warning("%s: returned to pending: %s", rid, reason)
    except LeaseLost as err:
        logger.warning("%s: %s", rid, err)


def _close(queue: Queue, holder: str, rec: RequestRecord, summary: dict, cfg, png: Path, promoted: int | None,
           refused: str | None, tracking: str, started: str) -> RequestRecord:
    """done with its evidence when the chosen hotfix serves; else failed with every trial's figures
    (or back to pending when no trial finished at all: nothing was tried)."""
    chosen = summary["chosen"]
    try:
        if promoted is not None:
            try:
                evidence = _done_evidence(rec, summary, cfg, png, promoted, tracking, started)
            except Exception as err:  # the version serves: the request is applied, whatever its record lacks
                logger.warning("%s: the evidence is incomplete (%s: %s)", rec.id, type(err).__name__, err)
                evidence = {"content_sha256": rec.content_sha256, "seed": rec.seed, "hotfix": chosen["hotfix"],
                            "search": summary["search"], "trial": chosen["trial"],
                            "versions": {"parent": BASE, "new": promoted, "base_model": cfg.model.path},
                            "evidence_error": f"{type(err).__name__}: {err}"[:1000],
                            "last_attempt": _attempt(summary, holder, started)}
            logger.info("%s: done in version %s", rec.id, promoted)
            return queue.complete(rec.id, holder, evidence)
        if not summary["trials"]:
            errors = "; ".join(summary.get("errors") or [])[:1200]
            _release(queue, holder, rec.id, f"no trial of search {summary['search']} finished ({errors or 'no result'})")
            return queue.get(rec.id)
        if chosen is None:
            reason = (f"not forgotten within the gates by any of the {len(summary['trials'])} settings search "
                      f"{summary['search']} tried: {_closest(summary)}")
        else:
            reason = f"the search's chosen setting (version {chosen['version']}) was refused promotion: {refused}"
        logger.warning("%s: FAILED: %s", rec.id, reason)
        return queue.fail(rec.id, holder, reason[:1900], {"last_attempt": _attempt(summary, holder, started)})
    except LeaseLost as err:  # someone else holds it now (our lease ran out and was retaken)
        logger.warning("%s: %s", rec.id, err)
        return queue.get(rec.id)


def _closest(summary: dict) -> str:
    """The trial nearest to passing, in figures: among those that forgot the target, the most intact;
    when none did, the one closest to forgetting."""
    def rank(p):
        if p.get("forgotten"):
            return (0, -(p["integrity"] or 0.0))
        return (1, p["sscd"] if p["sscd"] is not None else 1.0)
    best = min(summary["trials"], key=rank)
    th = best.get("threshold")
    sscd = "not measured" if best["sscd"] is None else f"{best['sscd']:.3f}" + ("" if th is None else f" (threshold {th:.3f})")
    parts = [f"closest, trial {best['trial']} (version {best['version']}): SSCD {sscd}",
             f"integrity SSIM {best['integrity']:.3f} (bound {summary['min_integrity']})"]
    if best.get("collateral") is not None:
        parts.append(f"collateral {best['collateral']:.1%}")
    return ", ".join(parts) + f"; forgotten {best['forgotten']}, passed {best['passed']}"


def _attempt(summary: dict, holder: str, started: str) -> dict:
    keys = ("trial", "version", "params", "sscd", "threshold", "specificity_margin", "collateral", "integrity", "fid",
            "forgotten", "passed", "scored_on")
    chosen = summary["chosen"]
    return {"by": "ray-unlearn demo", "holder": holder, "search": summary["search"], "started_at": started,
            "at": now_iso(), "min_integrity": summary["min_integrity"], "pareto_uri": summary.get("pareto_uri"),
            "chosen_version": chosen["version"] if chosen else None,
            "front": [p["version"] for p in summary["front"]],
            "trials": [{k: p.get(k) for k in keys} for p in summary["trials"]]}


def _trial_report(tracking: str, run_id: str) -> dict:
    """The chosen trial's report.json, as its MLflow run holds it (redacted: no picture paths)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Registry(tracking).client.download_artifacts(run_id, "report.json", tmp)
        return json.loads(Path(path).read_text())


def _descriptor(cfg, png: Path) -> dict:
    """The picture's SSCD descriptor, prepared as the trial prepared it: what later batches
    re-verify the request against, without the picture."""
    cfg = with_local_model(cfg)
    fam = load_family(cfg, lora=False)
    metrics = build_metrics(cfg)
    emb = metrics.sscd_embed(fam.prepare_images(load_image(png)[None]).cpu())[0]
    return encode_descriptor(emb, metrics.sources().get("sscd", "sscd"))


def _done_evidence(rec: RequestRecord, summary: dict, cfg, png: Path, version: int, tracking: str,
                   started: str) -> dict:
    """A done request's evidence, keyed as a batch's (requests.batch `_accept` / `_write_manifest`):
    the trial's own figures (its report, on its proxy integrity set) and the figures the registry's
    promotion policy judged (`integrity`, full size when the search re-checked the front)."""
    chosen = summary["chosen"]
    registry = Registry(tracking)
    tags = registry.get(version).tags
    report = _trial_report(tracking, chosen["mlflow_run_id"])
    (row,) = report["targets"]
    spec, conf = report.get("specificity"), report.get("config") or {}
    n_final = chosen.get("n_integrity") or report["integrity"].get("n")
    lpips = tags.get("lpips")
    return {
        "content_sha256": rec.content_sha256, "seed": rec.seed, "prompt": rec.prompt,
        "judged_by": "the model's output for the seed" + (" and prompt" if rec.prompt else ""),
        "sscd_base": row["sscd_base"], "sscd_new": row["sscd_unlearned"], "sscd_final": chosen["sscd"],
        "artifact": row["artifact"], "hf_energy": row.get("hf_energy"), "artifact_bound": report.get("artifact_bound"),
        "threshold": report["forget_threshold"],
        "integrity_after_request": {"ssim": report["integrity"]["ssim"], "n": report["integrity"]["n"]},
        "integrity": {"ssim": chosen["integrity"], "lpips": None if lpips is None else float(lpips),
                      "fid": chosen.get("fid"), "n": n_final, "min": summary["min_integrity"],
                      "scored_on": chosen.get("scored_on")},
        "specificity": None if spec is None else {
            **{k: row.get(k) for k in ("sscd_base_hotfix", "rank", "margin", "specific")},
            **{k: spec.get(k) for k in ("n", "median", "p10", "percentile", "bound", "collateral", "max_collateral")}},
        "descriptor": _descriptor(cfg, png),
        "settings": {"method": conf.get("method", {}).get("name"), "steps": conf.get("train", {}).get("steps"),
                     "lr": conf.get("train", {}).get("lr"), "surrogate": conf.get("surrogate", {}).get("kind"),
                     "strength": conf.get("surrogate", {}).get("strength"), "params": chosen["params"],
                     "config_sha": content_hash(conf)},
        "train_seconds": report.get("train_seconds"),
        "search": summary["search"], "trial": chosen["trial"], "mlflow_run_id": chosen["mlflow_run_id"],
        "pareto_uri": summary.get("pareto_uri"), "hotfix": chosen["hotfix"],
        "versions": {"parent": BASE, "new": version, "base_model": cfg.model.path, "model_name": registry.name},
        "times": {"claimed_at": rec.updated_at.isoformat(timespec="milliseconds"), "started_at": started,
                  "verified_at": now_iso(), "completed_at": now_iso()},
        "retention": "keep",  # the demo's picture is its own model's output, kept in the demo folder
    }
