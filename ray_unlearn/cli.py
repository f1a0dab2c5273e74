"""`ray-unlearn`: the command line. Thin: parse, build a config, call the engine or the platform, print.

Results go to stdout (a summary, or JSON with --json); progress and log lines go to stderr through
stdlib logging (configured once, here). Exit codes: `ray_unlearn.exit_codes`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ray_unlearn.exit_codes import ExitCode

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Remove specific outputs from a trained diffusion model, without a prompt, and prove it.",
)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[list[str], typer.Option("--set", "-s", help="Override a config key: train.lr=1e-4 (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON (for scripts).")]
TargetOpt = Annotated[list[Path], typer.Option("--target", help="Image file of an output to forget (repeatable).")]
TargetSeedOpt = Annotated[list[int], typer.Option("--target-seed", help="Forget the base model's output for this seed (repeatable).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Start from the method's preset: 'demo' (the defaults) or 'paper' (the paper's setup); --config and --set apply on top.", show_default=False)]


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines to stderr through rich, once per process: ray_unlearn's at `level`, other
    libraries' (Ray, MLflow, optuna) at WARNING."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        handler = RichHandler(console=Console(stderr=True), show_path=False, log_time_format="[%X]")
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("ray_unlearn").setLevel(level)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug log lines.")] = False) -> None:
    setup_logging(logging.DEBUG if verbose else logging.INFO)


def _console() -> Console:
    # a pipe or a job log gets whole table rows, not rows wrapped at 80 columns
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _fail(msg: str, code: ExitCode = ExitCode.USAGE) -> NoReturn:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(int(code))


def _infra() -> tuple[type[BaseException], ...]:
    """Storage, MLflow or Ray unreachable or refusing: exit 4 (ExitCode.INFRASTRUCTURE)."""
    from ray_unlearn.platform.errors import infrastructure_errors

    return infrastructure_errors()


def _config(config, sets, method=None, steps=None, targets=(), target_seeds=(), preset=None):
    from ray_unlearn.config import ConfigError, load_config

    overrides = list(sets)
    if method:
        overrides.insert(0, f"method.name={method}")
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    try:
        cfg = load_config(config, overrides, preset=preset)
        extra = [{"image": str(t)} for t in targets] + [{"seed": s} for s in target_seeds]
        if extra:
            from ray_unlearn.config import validate

            data = cfg.model_dump(mode="json")
            data["targets"] = data["targets"] + extra
            cfg = validate(data)
        return cfg
    except ConfigError as err:
        _fail(str(err))


def _summary(report: dict) -> str:
    lines = []
    th = report.get("forget_threshold") or {}
    if th:
        lines.append(f"forget threshold: SSCD < {th['value']:.3f} ({th['kind']}: {th.get('source', '')})")
    for r in report.get("targets", []):
        verdict = "forgotten" if r["forgotten"] else f"NOT forgotten ({r['why']})"
        lines.append(f"  target {r['id']}: SSCD base {r['sscd_base']:.3f} -> {r['sscd_unlearned']:.3f}  {verdict}")
        if r.get("rank") is not None:
            rule = ("specificity rule off" if r.get("margin") is None else
                    f"margin {r['margin']:+.3f} to their low percentile ({'specific' if r['specific'] else 'NOT specific'})")
            lines.append(f"    SSCD(base, hotfix) {r['sscd_base_hotfix']:.3f}: {r['rank']:.0%} of unrelated outputs moved as "
                         f"far; {rule}")
    s = report.get("specificity")
    if s:
        lines.append(f"specificity on {s['n']} unrelated seeds: SSCD(base, hotfix) median {s['median']:.3f}, p10 {s['p10']:.3f}; "
                     f"collateral forgetting {s['collateral']:.0%} (bound {s['max_collateral']:.0%})")
    i = report.get("integrity", {})
    lines.append(
        f"integrity on {i.get('n')} seeds: SSIM {i.get('ssim')}  LPIPS {i.get('lpips')}  FID {i.get('fid')}"
        f"  ({'ok' if i.get('ok') else 'REFUSED: ' + str(i.get('why') or 'below bound ' + str(i.get('min_ssim')))})"
    )
    if i.get("prompts"):  # sd3 with model.sd3.extra_prompts: each prompt apart, each one gated
        from ray_unlearn.requests.cli import prompt_table

        console = _console()
        with console.capture() as table:
            console.print(prompt_table(i["prompts"], f"integrity by prompt (each needs SSIM >= {i.get('min_ssim')})"))
        lines.extend(line.rstrip() for line in table.get().rstrip("\n").split("\n"))
    for why in (i.get("unavailable") or {}).values():
        lines.append(f"  {why}")
    lines.append(f"passed: {report.get('passed')}   ({report.get('wall_seconds')} s)")
    return "\n".join(lines)


@app.command()
def unlearn(
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a literal default
    target: TargetOpt = [],  # noqa: B006
    target_seed: TargetSeedOpt = [],  # noqa: B006
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="The unlearning method (`ray-unlearn methods` lists them).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("runs/unlearn"),
    preset: PresetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Unlearn targets from a model (default: the shipped demo model); writes OUT/report.json,
    OUT/hotfix/ (a diffusers DDPMPipeline) and OUT/before_after.png."""
    cfg = _config(config, set_, method, steps, target, target_seed, preset)
    if not cfg.targets:
        _fail("no targets: give --target IMAGE and/or --target-seed N (or `targets:` in the config)")
    from ray_unlearn.engine import run_unlearning
    from ray_unlearn.platform.models import with_local_model

    try:
        report = run_unlearning(with_local_model(cfg), out, progress=not json_out)
    except _infra() as err:
        _fail(str(err), ExitCode.INFRASTRUCTURE)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        _fail(str(err))
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(_summary(report))
        typer.echo(f"report: {out / 'report.json'}\nhotfix: {report['hotfix']['hotfix']}\npicture: {report['pictures']['before_after']}")


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="The unlearned model (diffusers dir, hub id or s3:// prefix).")],
    base: Annotated[str, typer.Option("--base", help="The base model (same forms).")] = "demo",
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006
    target: Annotated[list[Path], typer.Option("--target")] = [],  # noqa: B006
    target_seed: Annotated[list[int], typer.Option("--target-seed")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write report.json and pictures here.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Forgetting and integrity figures for any two models (base vs MODEL)."""
    cfg = _config(config, set_, None, None, target, target_seed)
    if not cfg.targets:
        _fail("no targets: give --target IMAGE and/or --target-seed N")
    from ray_unlearn.engine import evaluate_models
    from ray_unlearn.platform.models import local_model

    try:
        report = evaluate_models(cfg, local_model(base, cfg), local_model(model, cfg), out, progress=not json_out)
    except _infra() as err:
        _fail(str(err), ExitCode.INFRASTRUCTURE)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(json.dumps(report, indent=2) if json_out else _summary(report))


@app.command()
def sample(
    seeds: Annotated[list[int], typer.Argument(help="Seeds to render: each names one output (its initial noise).")],
    model_path: Annotated[Optional[str], typer.Option("--model-path", help="'demo', a diffusers dir, hub id or s3:// prefix (default: the config's model.path).", show_default=False)] = None,
    version: Annotated[Optional[str], typer.Option("--version", help="A registered hotfix instead: its number, or @ALIAS (e.g. @production, the serving one).", show_default=False)] = None,
    model: ModelOpt = None,
    tracking_uri: TrackingOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for seed-N.png and grid.png.")] = Path("runs/samples"),
) -> None:
    """Render a model's outputs for SEEDS (the serving hotfix with --version @production): what a
    deletion request refers to, as PNG files and one grid."""
    cfg = _config(config, set_)
    if version is not None and model_path is not None:
        _fail("give --model-path or --version, not both")
    from ray_unlearn.engine import render_seeds
    from ray_unlearn.platform.models import local_model

    path = model_path or cfg.model.path
    if version is not None:
        from ray_unlearn.platform.promotion import DEFAULT_MODEL_NAME
        from ray_unlearn.platform.registry import Registry

        reg = Registry(tracking_uri, model or DEFAULT_MODEL_NAME)
        try:
            v = reg.serving(version[1:]) if version.startswith("@") else reg.get(version)
        except LookupError as err:
            _fail(str(err))
        except _infra() as err:
            _fail(f"MLflow at {reg.uri}: {err}", ExitCode.INFRASTRUCTURE)
        if v is None:
            _fail(f"no version of {reg.name} holds the alias {version}; see `ray-unlearn versions`")
        path = v.source
    try:
        files = render_seeds(cfg, local_model(path, cfg), seeds, out)
    except _infra() as err:
        _fail(str(err), ExitCode.INFRASTRUCTURE)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    typer.echo(f"{len(seeds)} output(s) of {path}:\n" + "\n".join(f"  {f}" for f in files))


@app.command()
def methods(json_out: JsonOpt = False) -> None:
    """List the unlearning methods, their settings and presets."""
    from ray_unlearn.methods import METHODS

    rows = {name: {"doc": (m.config.__doc__ or "").strip(), "settings": m.config().model_dump(),
                   "presets": {"demo": {}, **m.presets}} for name, m in METHODS.items()}
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    for name, row in rows.items():
        typer.echo(f"{name}: {row['doc']}\n    {row['settings']}\n    presets: {', '.join(row['presets'])}")


@app.command()
def bench(
    steps: Annotated[int, typer.Option(help="Timed steps per variant.")] = 10,
    json_out: JsonOpt = False,
) -> None:
    """Side-by-side timings: surgery step vs plain fine-tuning step, sampling images/s."""
    from ray_unlearn.bench import run_benchmark

    res = run_benchmark(steps=steps, progress=not json_out)
    typer.echo(json.dumps(res, indent=2) if json_out else "\n".join(f"{k}: {v}" for k, v in res.items()))


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006
    target: TargetOpt = [],  # noqa: B006
    target_seed: TargetSeedOpt = [],  # noqa: B006
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="The unlearning method (`ray-unlearn methods` lists them).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray Train workers (one per GPU).")] = 1,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--no-gpu", help="Train on GPUs (default: if the cluster has any).", show_default=False)] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Where runs go: a folder or s3://bucket/prefix (default: $RAY_UNLEARN_STORE or ./ray_unlearn_store).", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name (default: derived from the config and --workers; the same name resumes).", show_default=False)] = None,
    max_failures: Annotated[int, typer.Option("--max-failures", min=0, help="Worker-group restarts from the last checkpoint.")] = 2,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Checkpoint every N steps.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as one JSON line (for scripts and job logs).")] = False,
    preset: PresetOpt = None,
) -> None:
    """Unlearn on Ray Train: joins the cluster of a `ray job submit` job (RAY_ADDRESS) or starts a
    local Ray; data-parallel workers, checkpoints, restarts from the last one."""
    cfg = _config(config, set_, method, steps, target, target_seed, preset)
    if not cfg.targets:
        _fail("no targets: give --target IMAGE and/or --target-seed N (or `targets:` in the config)")
    from ray_unlearn.platform.cluster import has_gpus, init_ray, shutdown_ray
    from ray_unlearn.platform.train import TrainingFailed, run_train
    from ray_unlearn.storage import store_uri

    try:
        init_ray()
        use_gpu = gpu if gpu is not None else has_gpus()
        out = run_train(cfg, num_workers=workers, use_gpu=use_gpu, storage_path=store_uri(storage), name=name,
                        max_failures=max_failures, checkpoint_every=checkpoint_every)
    except TrainingFailed as err:
        _fail(f"training failed after {max_failures} restart(s): {err}", ExitCode.REQUEST_FAILED)
    except _infra() as err:
        _fail(str(err), ExitCode.INFRASTRUCTURE)
    finally:
        shutdown_ray()
    out["report"] = out.pop("report_uri")  # where the report is (the dict itself is in the store)
    out["use_gpu"] = use_gpu
    if json_out:
        typer.echo(json.dumps(out))
        return
    sscd, ssim = out.get("sscd"), out.get("integrity_ssim")
    typer.echo(
        f"run {out['name']}: {out.get('step')} steps on {out.get('world_size')} {'GPU' if use_gpu else 'CPU'} worker(s)\n"
        f"forgotten: {out.get('forgotten')}   SSCD {'n/a' if sscd is None else f'{sscd:.3f}'}"
        f"   integrity SSIM {'n/a' if ssim is None else f'{ssim:.3f}'}   passed: {out.get('passed')}\n"
        f"hotfix: {out['hotfix']}\nreport: {out['report']}"
    )


# Why a search or the demo promoted nothing, when no single gate's refusal says more.
NOTHING_PASSED = ("no point of the front passed every gate (target forgotten specifically, integrity SSIM "
                  "and collateral forgetting within their bounds): each point's figures are in pareto.json")
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Registered model name (default: ray-unlearn-hotfix).")]
TrackingOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db).")]


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="The hotfix version to serve.")],
    model: ModelOpt = None,
    alias: Annotated[str, typer.Option("--alias", help="The alias that serves.")] = "production",
    tracking_uri: TrackingOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Skip the check of the version's evaluation (forgotten, integrity): serve it anyway.")] = False,
) -> None:
    """Serve a registered hotfix: move ALIAS to VERSION, if its evaluation shows it forgot every
    target and kept the other outputs (else exit 3 and the alias stays where it was)."""
    from ray_unlearn.platform.promotion import DEFAULT_MODEL_NAME, PromotionRefused
    from ray_unlearn.platform.registry import Registry

    reg = Registry(tracking_uri, model or DEFAULT_MODEL_NAME)
    try:
        before = reg.serving(alias)
        v = reg.promote(version, alias, force=force)
    except PromotionRefused as err:
        _fail(f"{reg.name}: {err}", ExitCode.GATE_REFUSED)
    except LookupError as err:
        _fail(str(err))
    except _infra() as err:
        _fail(f"MLflow at {reg.uri}: {err}", ExitCode.INFRASTRUCTURE)
    forced = f"; forced: {v.refusal()}" if force and v.refusal() else ""
    was = f"; was version {before.version}" if before and before.version != v.version else ""
    typer.echo(f"{reg.name} version {v.version} now serves as @{alias} ({v.summary()}{forced}{was})")


@app.command()
def versions(model: ModelOpt = None, tracking_uri: TrackingOpt = None, json_out: JsonOpt = False) -> None:
    """The registered hotfix versions, their aliases and evaluation figures."""
    from dataclasses import asdict

    from ray_unlearn.platform.promotion import DEFAULT_MODEL_NAME
    from ray_unlearn.platform.registry import Registry

    reg = Registry(tracking_uri, model or DEFAULT_MODEL_NAME)
    try:
        rows = reg.versions()
    except _infra() as err:
        _fail(f"MLflow at {reg.uri}: {err}", ExitCode.INFRASTRUCTURE)
    if json_out:
        typer.echo(json.dumps([{**asdict(v), "passed": v.passed} for v in rows], indent=2))
        return
    table = _table("version", "aliases", "passed", "sscd", "threshold", "ssim", "fid", "source")
    for v in rows:
        table.add_row(str(v.version), ",".join("@" + a for a in v.aliases), str(v.passed).lower(), v.tags.get("sscd", ""),
                      v.tags.get("threshold", ""), v.tags.get("integrity_ssim", ""), v.tags.get("fid", ""), v.source)
    _console().print(table)
    if not rows:
        typer.echo(f"(no versions of {model or DEFAULT_MODEL_NAME})")


def _table(*columns: str) -> Table:
    """A plain table: a header row, then one line per row (easy to read and to grep)."""
    return Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")


def _front_table(summary: dict) -> Table:
    table = _table("version", "sscd", "integrity", "fid", "scored on", "settings")
    chosen = (summary.get("chosen") or {}).get("version")
    for p in summary.get("front", []):
        settings = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                             for k, v in p["params"].items())
        table.add_row(f"{p['version']}{' *' if p['version'] == chosen else ''}", f"{p['sscd']:.3f}", f"{p['integrity']:.3f}",
                      "" if p.get("fid") is None else f"{p['fid']:.1f}", p.get("scored_on", ""), settings)
    return table


def _print_search(summary: dict) -> None:
    n_ok, n_front = len(summary["trials"]), len(summary["front"])
    forgot = sum(p["forgotten"] for p in summary["trials"])
    typer.echo(f"\nsearch {summary['search']}: {n_ok} trials ({forgot} forgot the target), "
               f"{len(summary['errors'])} failed; base model sampled {summary['base_sampling_passes']} time(s)")
    typer.echo(f"forget threshold SSCD < {summary['threshold']}; integrity bound SSIM >= {summary['min_integrity']}")
    typer.echo(f"Pareto front ({n_front} point{'s' * (n_front != 1)}; * = chosen), hypervolume {summary['hypervolume']}:")
    if n_front:
        _console().print(_front_table(summary))
    else:
        typer.echo("  (empty: no trial forgot the target; widen the search space)")
    typer.echo(f"pareto: {summary['pareto_uri']}  (and pareto.png beside it)")


@app.command()
def search(
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006
    target: TargetOpt = [],  # noqa: B006
    target_seed: TargetSeedOpt = [],  # noqa: B006
    space: Annotated[str, typer.Option("--space", help="A shipped search space (one per method, and demo: search_spaces/) or a YAML file.")] = "surrogate",
    trials: Annotated[int, typer.Option("--trials", min=1, help="Trials to run.")] = 16,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray Train workers per trial (one per GPU).")] = 1,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--no-gpu", help="Train on GPUs (default: if the cluster has any).", show_default=False)] = None,
    proxy_integrity: Annotated[int, typer.Option("--proxy-integrity", min=0, help="Score trials on this many integrity seeds, re-check the front at eval.n_integrity (0: score at full size).")] = 16,
    max_concurrent: Annotated[Optional[int], typer.Option("--max-concurrent", help="Trials at once (default: what the cluster fits).", show_default=False)] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="A folder or s3://bucket/prefix (default: $RAY_UNLEARN_STORE or ./ray_unlearn_store).", show_default=False)] = None,
    tracking_uri: TrackingOpt = None,
    model: ModelOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Search name (default: derived from the settings; the same name resumes).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="The searcher's seed.")] = 0,
    promote_best: Annotated[bool, typer.Option("--promote", help="Serve the chosen front point (@production) when it passes.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write pareto.json / pareto.png here.")] = None,
    preset: PresetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Ray Tune's Pareto search over a search space: forgetting (SSCD) vs. integrity (SSIM); every
    trial a Ray Train run, an MLflow child run and a registered hotfix version. With --promote,
    exit 3 when nothing could be promoted (no front point within the bound, or the gate refused)."""
    space_method = None
    if preset:  # the preset is the searched method's: read it from the space
        from ray_unlearn.config import ConfigError
        from ray_unlearn.search_space import load_space

        try:
            space_method = load_space(space)["method"]
        except ConfigError as err:
            _fail(str(err))
    cfg = _config(config, set_, space_method, None, target, target_seed, preset)
    if not cfg.targets:
        _fail("no targets: give --target IMAGE and/or --target-seed N (or `targets:` in the config)")
    from ray_unlearn.config import ConfigError
    from ray_unlearn.platform.cluster import has_gpus, init_ray
    from ray_unlearn.platform.promotion import DEFAULT_MODEL_NAME, PromotionRefused
    from ray_unlearn.platform.registry import Registry
    from ray_unlearn.platform.search import SearchOptions, run_search
    from ray_unlearn.storage import store_uri

    opts = SearchOptions(space=space, trials=trials, workers=workers, proxy_integrity=proxy_integrity or None,
                         storage=store_uri(storage), tracking_uri=tracking_uri, model_name=model or DEFAULT_MODEL_NAME,
                         name=name, max_concurrent=max_concurrent, seed=seed, out_dir=str(out) if out else None)
    try:
        init_ray()
        opts.gpu = gpu if gpu is not None else has_gpus()
        summary = run_search(cfg, opts, progress=not json_out)
        if promote_best and summary["chosen"]:
            try:
                summary["promoted_version"] = Registry(tracking_uri, opts.model_name).promote(summary["chosen"]["version"]).version
            except PromotionRefused as err:
                summary["promotion_refused"] = str(err)
    except _infra() as err:
        _fail(str(err), ExitCode.INFRASTRUCTURE)
    except (ConfigError, ValueError) as err:
        _fail(str(err))
    if promote_best and not summary.get("promoted_version"):
        summary["promotion_refused"] = summary.get("promotion_refused") or NOTHING_PASSED
    if json_out:
        typer.echo(json.dumps(summary, default=str))
    else:
        _print_search(summary)
        if summary.get("promoted_version"):
            typer.echo(f"promoted: {opts.model_name} version {summary['promoted_version']} @production")
        elif promote_best:
            typer.echo(f"nothing promoted: {summary['promotion_refused']}")
    if promote_best and not summary.get("promoted_version"):
        raise typer.Exit(int(ExitCode.GATE_REFUSED))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Everything goes here: store, MLflow DB, pareto.")] = Path("runs/demo"),
    trials: Annotated[int, typer.Option("--trials", min=2, help="Search trials.")] = 6,
    space: Annotated[str, typer.Option("--space", help="A shipped search space name or a YAML file (sd3: 'demo' means sd3).")] = "demo",
    family: Annotated[str, typer.Option("--family", help="ddpm: the faces model (seed 7); sd3: the flag model (its card's wrong flag).")] = "ddpm",
    set_: SetOpt = [],  # noqa: B006
    json_out: JsonOpt = False,
) -> None:
    """The main job, end to end on embedded defaults: a deletion request for the shipped demo
    model's output (seed 7; with --family sd3, the flag model's wrong flag), a Pareto search on
    local Ray, MLflow on SQLite, the best hotfix promoted."""
    from ray_unlearn.config import ConfigError
    from ray_unlearn.platform.demo import run_demo

    try:
        summary = run_demo(out, trials=trials, space=space, progress=not json_out, sets=set_, family=family)
    except _infra() as err:
        _fail(str(err), ExitCode.INFRASTRUCTURE)
    except (ConfigError, ValueError) as err:
        _fail(str(err))
    if json_out:
        typer.echo(json.dumps(summary, default=str))
        return
    typer.echo(f"deletion request {summary['request']} ({'new' if summary['request_new'] else 'already queued'})")
    _print_search(summary)
    if summary["promoted_version"]:
        typer.echo(f"promoted: ray-unlearn-hotfix version {summary['promoted_version']} now serves as @production")
    else:
        typer.echo(f"nothing promoted: {summary['promotion_refused'] or NOTHING_PASSED}")
    typer.echo(f"deletion request {summary['request']}: {summary['request_state']}"
               + (f" ({summary['request_reason']})" if summary.get("request_reason") else "")
               + f"; see `ray-unlearn requests show {summary['request']} --store {summary['out_dir']}/store`")
    typer.echo(f"see the runs, sample grids and the registry:\n  {summary['mlflow_ui']}\n  then open http://127.0.0.1:5000")


from ray_unlearn.requests.cli import requests_app  # noqa: E402

app.add_typer(requests_app, name="requests", help="Deletion requests: submit, list, show (the queue).")


def run_command(name: str, argv: list[str], prog_name: str) -> int:
    """One command as a `jobs/` script runs it: its exit code returned, not raised."""
    try:
        app([*name.split(), *argv], prog_name=prog_name)
    except SystemExit as exit_:  # typer ends with SystemExit
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
