"""The main job on embedded defaults: a deletion request, a Pareto search, a promoted hotfix.

Everything lives under one folder (default runs/demo): the object store (store/), MLflow's SQLite
store (mlflow.db) and its artifacts (mlartifacts/), pareto.json / pareto.png. Local Ray, the
shipped demo model, no network.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ray_unlearn.config import load_config
from ray_unlearn.data import save_image
from ray_unlearn.engine import load_family
from ray_unlearn.platform.cluster import init_ray
from ray_unlearn.platform.models import with_local_model
from ray_unlearn.platform.search import SearchOptions, run_search
from ray_unlearn.platform.promotion import PromotionRefused
from ray_unlearn.platform.registry import Registry
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
    record, new = Queue(open_store(store_uri)).submit(png, seed=seed, note=note)
    logger.info("deletion request %s (%s): the demo model's output for seed %d", record.id,
                "new" if new else "already queued", seed)

    # 2. the search for the settings that forget it while changing the model least
    target = {"image": str(png), "seed": seed, **({"prompt": prompt} if prompt else {})}
    cfg = load_config(None, list(sets), base={**base, "targets": [target]})
    init_ray(num_cpus=os.cpu_count())
    opts = SearchOptions(space=space, trials=trials, storage=store_uri, tracking_uri=tracking,
                         proxy_integrity=proxy_integrity, out_dir=str(root))
    summary = run_search(cfg, opts, progress=progress)
    logger.info("search done: %d trials, %d on the front", len(summary["trials"]), len(summary["front"]))

    # 3. the hotfix to ship: the most intact front point within the integrity bound
    promoted, refused = None, None
    if summary["chosen"]:
        try:
            promoted = Registry(tracking).promote(summary["chosen"]["version"]).version
        except PromotionRefused as err:
            refused = str(err)
    summary.update({"request": record.id, "request_new": new, "promoted_version": promoted, "promotion_refused": refused,
                    "mlflow_ui": f"mlflow ui --backend-store-uri {tracking} --port 5000",
                    "out_dir": str(root)})
    return summary
