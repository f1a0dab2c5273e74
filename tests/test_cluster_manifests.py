"""The KubeRay manifests in cluster/ against the code: kinds, GPUs, entry points, env names, schedule.

No Kubernetes here: these checks catch what a cluster would only reject (or silently ignore) after
minutes of scheduling: a script or flag that does not exist, an env var nobody reads, a worker
group without GPUs, a CronJob that lets two batches overlap.
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import metadata
from pathlib import Path

import procs
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
FILES = sorted(CLUSTER.glob("*.yaml"))
KINDS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "RayCronJob": "ray.io/v1",
    "CronJob": "batch/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
# env names the code of this repo does not read itself, and the library source that does
LIBRARY_ENV = {
    "AWS_ACCESS_KEY_ID": "botocore/credentials.py",
    "AWS_SECRET_ACCESS_KEY": "botocore/credentials.py",
    "MLFLOW_EXPERIMENT_NAME": "mlflow/environment_variables.py",
    "RAY_AUTH_MODE": "ray/_private/authentication/authentication_token_setup.py",
    "RAY_AUTH_TOKEN": "ray/exceptions.py",
}
# what every Ray pod needs (read by ray_unlearn itself)
REQUIRED_ENV = {"RAY_UNLEARN_STORE", "MLFLOW_TRACKING_URI", "RAY_UNLEARN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"}


def _docs() -> list[tuple[Path, dict]]:
    return [(f, d) for f in FILES for d in yaml.safe_load_all(f.read_text()) if d is not None]


def _of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(f, d) for f, d in _docs() if d["kind"] == kind]


def _cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: standing clusters and those RayJobs / RayCronJobs create."""
    out = []
    pick = {"RayCluster": lambda s: s,
            "RayJob": lambda s: s.get("rayClusterSpec"),
            "RayCronJob": lambda s: s["jobTemplate"].get("rayClusterSpec")}
    for f, d in _docs():
        spec = pick[d["kind"]](d["spec"]) if d["kind"] in pick else None
        if spec:
            out.append((f"{f.name}:{d['kind']}", spec))
    return out


def _ray_containers() -> list[tuple[str, dict]]:
    out = []
    for where, spec in _cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
        for group, g in groups:
            out += [(f"{where}:{group}:{c['name']}", c) for c in g["template"]["spec"]["containers"]]
    return out


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _commands() -> list[tuple[str, str]]:
    """Every `python jobs/X.py ...` command line in the manifests (entrypoints and shell args)."""
    out = []
    for f, d in _docs():
        for s in _strings(d):
            for m in re.finditer(r"python3? (jobs/[\w.-]+\.py)([^\n;&|]*)", s):
                out.append((f.name, m.group(0).strip()))
    return out


def _code_text() -> str:
    return "\n".join(p.read_text() for p in [*(REPO / "ray_unlearn").rglob("*.py"), *(REPO / "jobs").glob("*.py")])


def _env_names() -> dict[str, set[str]]:
    """Env names set anywhere: container env, runtimeEnvYAML env_vars, --runtime-env-json env_vars."""
    names: dict[str, set[str]] = {}

    def add(name, where):
        names.setdefault(name, set()).add(where)

    for f, d in _docs():
        for node in _walk(d):
            if isinstance(node, dict) and isinstance(node.get("env"), list):
                for e in node["env"]:
                    add(e["name"], f.name)
            if isinstance(node, dict) and isinstance(node.get("runtimeEnvYAML"), str):
                for k in (yaml.safe_load(node["runtimeEnvYAML"]).get("env_vars") or {}):
                    add(k, f.name)
        for s in _strings(d):
            for m in re.finditer(r"--runtime-env-json '(.+?)'", s, re.S):
                for k in json.loads(m.group(1)).get("env_vars") or {}:
                    add(k, f.name)
    return names


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for c in children:
        yield from _walk(c)


def _period_s(schedule: str) -> int | None:
    """The period of a simple cron schedule (every N minutes, hourly, daily), else None."""
    minute, hour, dom, month, dow = schedule.split()
    if (dom, month, dow) != ("*", "*", "*"):
        return None
    if m := re.fullmatch(r"\*/(\d+)", minute):
        return int(m.group(1)) * 60 if hour == "*" else None
    if minute.isdigit():
        return 3600 if hour == "*" else 86400 if hour.isdigit() else None
    return None


def test_manifests_exist():
    names = {f.name for f in FILES}
    assert {"raycluster.yaml", "rayjob-search.yaml", "rayjob-unlearn.yaml", "raycronjob-requests.yaml",
            "cronjob-requests.yaml", "kustomization.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_document_has_a_known_kind_and_api_version(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs
    for d in docs:
        assert d.get("kind") in KINDS, f"{path.name}: unexpected kind {d.get('kind')!r}"
        assert d.get("apiVersion") == KINDS[d["kind"]], f"{path.name}: {d['kind']} needs apiVersion {KINDS[d['kind']]}"
        if d["kind"] != "Kustomization":
            meta = d.get("metadata") or {}
            assert meta.get("name") or meta.get("generateName"), f"{path.name}: {d['kind']} has no name"


def test_kustomization_lists_existing_files():
    (_, k), = _of_kind("Kustomization")
    assert k["resources"]
    for r in k["resources"]:
        assert (CLUSTER / r).is_file(), r


def test_every_cluster_has_a_cpu_head_and_a_one_gpu_per_pod_worker_group():
    specs = _cluster_specs()
    assert len(specs) == 4  # the standing cluster, two RayJobs, the RayCronJob
    ray_minor = ".".join(metadata.version("ray").split(".")[:2])
    for where, spec in specs:
        assert spec["rayVersion"].startswith(ray_minor + "."), f"{where}: Ray {spec['rayVersion']} vs installed {ray_minor}"
        assert (spec.get("authOptions") or {}).get("mode") == "token", f"{where}: token authentication off"
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {}), f"{where}: GPU on the head"
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if any("nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {})
                             for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, f"{where}: no GPU worker group"
        for g in gpu_groups:
            assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], where
            assert g["maxReplicas"] >= 1, where
            for c in g["template"]["spec"]["containers"]:
                res = c["resources"]
                assert int(res["limits"]["nvidia.com/gpu"]) == 1, f"{where}: one GPU per pod"
                assert int(res.get("requests", res["limits"]).get("nvidia.com/gpu", 1)) == 1, where
                assert c["image"].endswith("-gpu"), f"{where}: a GPU pod needs a CUDA image"
        for name, c in _ray_containers():
            if name.startswith(where + ":"):
                assert c["image"].split(":")[1].startswith(spec["rayVersion"]), f"{name}: image vs rayVersion"


COMMANDS = _commands()


def test_entrypoints_are_found():
    scripts = {re.search(r"jobs/[\w.-]+\.py", c).group(0) for _, c in COMMANDS}
    assert {"jobs/search.py", "jobs/unlearn.py", "jobs/process_requests.py"} <= scripts


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c.split()[1]}" for w, c in COMMANDS])
def test_entrypoint_script_paths_and_flags_exist(where, command):
    words = command.split()
    script = REPO / words[1]
    assert script.is_file(), f"cluster/{where} runs {words[1]}, which is not in jobs/"
    for w in words[2:]:  # repository files an argument names (search spaces, configs)
        if re.fullmatch(r"[\w./-]+/[\w.-]+\.(ya?ml|py)", w):
            assert (REPO / w).is_file(), f"cluster/{where}: {w} does not exist"
    env = {**os.environ, "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
    out = procs.run([sys.executable, str(script), "--help"], env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out.stdout), \
            f"cluster/{where}: {words[1]} has no option {flag}"


def test_env_names_are_ones_the_code_or_its_libraries_read():
    code = _code_text()
    site = Path(yaml.__file__).resolve().parents[1]  # this venv's site-packages
    names = _env_names()
    assert names
    for name, where in sorted(names.items()):
        if f'"{name}"' in code:
            continue
        assert name in LIBRARY_ENV, f"{name} (set in {sorted(where)}) is read by no code here; a typo?"
        assert name in (site / LIBRARY_ENV[name]).read_text(), f"{name}: not in {LIBRARY_ENV[name]}"
    for name in REQUIRED_ENV:  # and the code does read the ones the pods must have
        assert f'"{name}"' in code, f"the code no longer reads {name}: update cluster/"


def test_every_ray_pod_gets_the_same_storage_tracking_and_credentials_env():
    containers = _ray_containers()
    assert containers
    first = None
    for where, c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        assert REQUIRED_ENV <= set(env), f"{where}: missing {REQUIRED_ENV - set(env)}"
        assert env["RAY_UNLEARN_STORE"]["value"].startswith("s3://"), where
        for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[secret]["valueFrom"], f"{where}: {secret} must come from a Secret"
        first = first or set(env)
        assert set(env) == first, f"{where}: env differs from the other Ray pods"


def test_cronjob_forbids_overlap_and_waits_for_an_authenticated_submit():
    (_, cron), = _of_kind("CronJob")
    (_, cluster), = _of_kind("RayCluster")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = " ".join([*container.get("command", []), *container.get("args", [])])
    assert "ray job submit" in command
    assert "--no-wait" not in command  # Forbid only holds while the pod waits for the Ray job
    assert f"--address http://{cluster['metadata']['name']}-head-svc:8265" in command
    submit_flags = re.findall(r"(?<!\S)(--[\w-]+)", command.split("ray job submit", 1)[1].split(" -- ", 1)[0])
    ray_cli = Path(os.path.abspath(sys.executable)).parent / "ray"
    help_text = procs.run([str(ray_cli), "job", "submit", "--help"], env={**os.environ, "COLUMNS": "250"},
                          timeout=120).stdout
    for flag in submit_flags:  # e.g. there is no --wait: waiting is the default
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), f"ray job submit has no {flag}"
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"  # a client turns auth on only when told to
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}


def test_raycronjob_cannot_overlap_by_deadline():
    (_, rcj), = _of_kind("RayCronJob")
    spec = rcj["spec"]
    assert set(spec) <= {"schedule", "jobTemplate", "suspend", "timeZone"}, "RayCronJob has no such field"
    assert spec["jobTemplate"]["entrypoint"].startswith("python jobs/")
    period = _period_s(spec["schedule"])
    assert period, f"cannot read the period of {spec['schedule']!r}"
    # no concurrencyPolicy in RayCronJob: a run that cannot outlive the period cannot overlap the next
    assert spec["jobTemplate"]["activeDeadlineSeconds"] < period
