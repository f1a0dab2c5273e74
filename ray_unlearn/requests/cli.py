"""`ray-unlearn requests ...`: submit, list, inspect, requeue and process deletion requests
(mounted by ray_unlearn.cli). Exit statuses: `ray_unlearn.exit_codes` (the table is in
docs/requests.md)."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ray_unlearn.exit_codes import ExitCode

logger = logging.getLogger(__name__)

requests_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deletion requests ('your model generates my face: remove it'): submit, list, show, requeue, process. "
    "They wait in a durable queue (a local folder or s3://bucket/prefix) until a processor takes them.",
)

StoreOpt = Annotated[Optional[str], typer.Option(
    "--store", help="Store URI: a folder or s3://bucket/prefix (default: $RAY_UNLEARN_STORE or ./ray_unlearn_store)",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]

# third-party packages whose errors mean a service is unreachable or refusing (exit 4), not bad usage
_INFRA_PACKAGES = ("botocore", "boto3", "urllib3", "sqlalchemy", "grpc")


def _fail(msg: str, code: ExitCode = ExitCode.USAGE) -> None:
    typer.secho(f"error: {_safe(msg)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(int(code))


def _exit_code_of(err: BaseException) -> ExitCode | None:
    """The exit status an error stands for (None: a bug; let it raise with its traceback)."""
    from ray_unlearn.config import ConfigError
    from ray_unlearn.platform.errors import infrastructure_errors
    from ray_unlearn.requests.lineage import LineageError
    from ray_unlearn.requests.models import RequestError
    from ray_unlearn.storage import NotFoundError

    if isinstance(err, (RequestError, ConfigError)):
        return ExitCode.USAGE
    if isinstance(err, LineageError):
        return ExitCode.GATE_REFUSED  # the lineage refuses to be built on: an operator resolves it
    if isinstance(err, (*infrastructure_errors(), NotFoundError, TimeoutError)):  # the CLI's one list
        return ExitCode.INFRASTRUCTURE
    if type(err).__module__.split(".")[0] in _INFRA_PACKAGES:  # e.g. a botocore error no store wrapped
        return ExitCode.INFRASTRUCTURE
    if isinstance(err, ValueError):
        return ExitCode.USAGE
    return None


@contextmanager
def _errors():
    try:
        yield
    except typer.Exit:
        raise
    except Exception as err:
        code = _exit_code_of(err)
        if code is None:
            raise
        detail = str(err) if code != ExitCode.INFRASTRUCTURE or type(err).__module__.startswith("ray_unlearn") \
            else f"{type(err).__name__}: {err}"
        _fail(detail, code)


def _uri(store: str | None) -> str:
    from ray_unlearn.storage import store_uri

    return store_uri(store)


def _queue(store: str | None, *, must_exist: bool = True, **options):
    """The queue of `store`; a local store that does not exist is an error for every command but
    submit (a typo would otherwise read as an empty queue)."""
    from ray_unlearn.requests.queue import Queue
    from ray_unlearn.storage import open_store

    uri = _uri(store)
    opened = open_store(uri)  # an unsupported URI is refused first
    if must_exist and not uri.startswith("s3://"):
        path = Path(uri[7:] if uri.startswith("file://") else uri)
        if not path.is_dir():
            from ray_unlearn.requests.models import RequestError

            raise RequestError(f"no store at {path}: the folder does not exist. Check --store / $RAY_UNLEARN_STORE "
                               "(a store is created by the first `requests submit`)")
    return Queue(opened, **options)


def _safe(value) -> str:
    # whatever is in the store is shown, never interpreted by the terminal
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in str(value))


def _console(err: bool = False):
    from rich.console import Console

    # not a terminal (cron, a pipe, tests): wide enough that an id or a reason is never cut
    return Console(stderr=err, width=None if sys.stdout.isatty() else 200, highlight=False, markup=False)


def _print_table(title: str | None, columns: list[str], rows: list[list]) -> None:
    from rich.table import Table

    table = Table(title=title, show_lines=False, title_justify="left")
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(_safe("" if v is None else v) for v in r))
    _console().print(table)


PROMPT_COLUMNS = ("prompt", "n", "SSIM", "SSIM min", "LPIPS", "SSCD median", "below", "copies")
# where a request's evidence holds per-prompt integrity rows (evaluate.integrity_by_prompt; sd3 with
# model.sd3.extra_prompts): (evidence key, key inside it, the table's title)
_PROMPT_ROWS = (("integrity_after_request", "prompts", "integrity by prompt, after this request"),
                ("integrity", "prompts", "integrity by prompt, the batch's final weights"),
                ("last_attempt", "integrity_prompts", "integrity by prompt, the last attempt"))


def prompt_table(rows: list[dict], title: str | None = None):
    """`evaluate.integrity_by_prompt`'s rows as a rich table, one line per prompt (the run's own
    marked); for `requests show`, `requests process` and `ray-unlearn unlearn/evaluate`."""
    from rich.table import Table

    table = Table(*PROMPT_COLUMNS, title=title, title_justify="left", caption_justify="left",
                  caption="SSIM: mean; SSCD median: of SSCD(base_i, hotfix_i); below: outputs under the forget "
                          "threshold; copies: outputs that copy the target, counted apart")
    for r in rows:
        cells = [f"{r['prompt']}{' (run prompt)' if r.get('own') else ''}", r.get("n"), r.get("ssim"),
                 r.get("ssim_min"), r.get("lpips"), r.get("sscd_median"), r.get("below_threshold"), r.get("copies")]
        table.add_row(*(_safe("n/a" if v is None else v) for v in cells))
    return table


def _lease(rec) -> str:
    if rec.state != "claimed":
        return ""
    return f"{rec.lease_holder} until {rec.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC"


@requests_app.command()
def submit(
    image: Annotated[Path, typer.Argument(help="Image of the output to remove (PNG, JPEG, WEBP, BMP, TIFF).")],
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the base model that produced it, if known.")] = None,
    note: Annotated[Optional[str], typer.Option("--note", help="Free text for the operators (plain text).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The prompt that produced the picture, for a "
                      "text-to-image model (sd3; required there, refused by unconditional models).")] = None,
    max_side: Annotated[int, typer.Option("--max-side", help="A picture larger than this on a side is downscaled "
                        "at the door (aspect kept; the original's hash is recorded): set it to the model's "
                        "resolution.")] = 1024,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check an image and queue a deletion request for it (a picture already queued is not added twice)."""
    from ray_unlearn.requests.queue import duplicate_notice

    with _errors():
        queue = _queue(store, must_exist=False, max_side=max_side)
        rec, created = queue.submit(image, seed=seed, note=note, prompt=prompt)
        notice = None if created else duplicate_notice(rec, seed, note, prompt)
    if json_out:
        typer.echo(json.dumps({"created": created, "record": rec.public(), "notice": notice}, indent=2))
        return
    if created:
        scaled = (f"; downscaled from {rec.original_size[0]}x{rec.original_size[1]} (original sha256 "
                  f"{rec.original_sha256[:12]}... recorded)" if rec.original_sha256 else "")
        said = f"; prompt {_safe(repr(rec.prompt))}" if rec.prompt is not None else ""
        typer.echo(f"submitted {rec.id} ({rec.width}x{rec.height} {rec.mode}){scaled}{said}; state: {rec.state}")
        return
    hint = (f" (requeue it: `ray-unlearn requests requeue {rec.id} --reason ...`)"
            if rec.state in ("failed", "not_produced") else "")
    typer.echo(f"already submitted as {rec.id}; state: {rec.state}{hint}")
    if notice:
        typer.echo(_safe(notice))


@requests_app.command("list")
def list_(
    state: Annotated[Optional[str], typer.Option("--state", help="pending | claimed | done | failed | not_produced "
                     "| invalid")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List requests, oldest first (claimed ones with their holder and lease expiry)."""
    from ray_unlearn.requests.models import check_state

    with _errors():
        state = check_state(state)  # before the store is looked at
        records = _queue(store).list(state)
    if json_out:
        typer.echo(json.dumps([r.public() for r in records], indent=2))
        return
    if not records:
        typer.echo("no requests" + (f" in state {state}" if state else ""))
        return
    _print_table(None, ["id", "state", "created (UTC)", "size", "lease (holder until)", "note / reason"], [
        [r.id, r.state, f"{r.created_at:%Y-%m-%d %H:%M:%S}", f"{r.width}x{r.height} {r.mode}", _lease(r),
         ((r.reason or "") if r.state in ("failed", "not_produced", "invalid") else (r.note or "")).split("\n")[0][:80]]
        for r in records])


@requests_app.command()
def show(
    request_id: Annotated[str, typer.Argument(metavar="ID", help="Request id (req-...).")],
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """A request: its record, evidence and ledger."""
    from ray_unlearn.requests.models import check_id

    with _errors():
        q = _queue(store) if check_id(request_id) else None
        rec, ledger = q.get(request_id), q.ledger(request_id)
    if json_out:
        typer.echo(json.dumps({"record": rec.public(), "ledger": ledger}, indent=2))
        return
    data = rec.public()
    evidence = data.pop("evidence")
    _print_table(f"request {rec.id}", ["field", "value"], [[k, v] for k, v in data.items()])
    rows, by_prompt = [], []
    for key, value in evidence.items():
        if key == "descriptor" and isinstance(value, dict) and "b64" in value:  # 1.4 kB of base64: say what it is
            value = {**value, "b64": f"<{len(str(value['b64']))} base64 chars>"}
        for where, inner, title in _PROMPT_ROWS:  # each prompt's integrity: a table of its own below
            if key == where and isinstance(value, dict) and isinstance(value.get(inner), list):
                by_prompt.append((title, value[inner]))
                value = {**value, inner: f"<{len(value[inner])} prompts: table below>"}
        rows.append([key, json.dumps(value)])
    if rows:
        _print_table("evidence", ["key", "value"], rows)
    else:
        typer.echo("evidence: (none yet)")
    for title, prompt_rows in by_prompt:
        _console().print(prompt_table(prompt_rows, title))
    _print_table("ledger", ["#", "at", "event", "from -> to", "holder", "reason"], [
        [e["seq"], e["at"], e["event"], f"{e['from'] or '-'} -> {e['to']}", e.get("holder"), e.get("reason")]
        for e in ledger])


@requests_app.command("mark-invalid")
def mark_invalid(
    request_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the ledger).")],
    store: StoreOpt = None,
) -> None:
    """Refuse a request (an operator's verdict); a processor holding it loses its lease."""
    with _errors():
        rec = _queue(store).mark_invalid(request_id, reason)
    typer.echo(f"{rec.id}: {rec.state}")


@requests_app.command()
def requeue(
    request_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the ledger), e.g. 'retry with lr 1e-5'.")],
    train_anyway: Annotated[bool, typer.Option("--train-anyway", help="For a not_produced request: train on it "
                            "although the model does not produce it (the override and its reason stay on the "
                            "record and in its evidence).")] = False,
    store: StoreOpt = None,
) -> None:
    """Put a failed or not_produced request back to pending (its attempts counted afresh)."""
    with _errors():
        rec = _queue(store).requeue(request_id, reason, train_anyway=train_anyway)
    typer.echo(f"{rec.id}: {rec.state}" + (" (operator override: train although not produced)"
                                           if rec.produced_override else ""))


@requests_app.command("purge-image")
def purge_image(request_id: Annotated[str, typer.Argument(metavar="ID")], store: StoreOpt = None) -> None:
    """Delete the stored image of a finished request (record, evidence and ledger stay)."""
    with _errors():
        rec = _queue(store).purge_image(request_id)
    typer.echo(f"{rec.id}: image purged; state {rec.state}")


class _SafeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _safe(super().format(record))


def _ensure_log_output() -> None:
    """Progress lines must reach cron and job logs: when nothing has configured logging (the main
    CLI does), print ray_unlearn's INFO lines to stderr, timestamped."""
    pkg = logging.getLogger("ray_unlearn")
    if logging.getLogger().handlers or pkg.handlers:
        if pkg.getEffectiveLevel() > logging.INFO:
            pkg.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)


def _summary(out) -> None:
    typer.echo(_safe(f"batch {out.batch or '-'}: {out.status}" + (f" ({out.message})" if out.message else "")))
    if out.requests:
        _print_table(None, ["request", "result", "version", "reason"],
                     [[r["id"], r["result"], r.get("version"), r.get("reason")] for r in out.requests])
    if out.integrity:
        i = out.integrity
        typer.echo(f"integrity vs base on {i['n']} seeds: SSIM {i['ssim']} (bound {i.get('min_ssim')}) "
                   f"LPIPS {i['lpips']} FID {i['fid']}")
        if i.get("prompts"):
            _console().print(prompt_table(i["prompts"], "integrity by prompt (each one gated)"))
    if out.reverified:
        ok = sum(r["forgotten"] is True for r in out.reverified)
        skipped = sum(r["forgotten"] is None for r in out.reverified)
        typer.echo(f"re-verified on the new version: {ok}/{len(out.reverified)} forgotten"
                   + (f" ({skipped} without seed or image: not re-verifiable)" if skipped else ""))
    typer.echo(f"({out.wall_seconds} s; exit status {out.exit_code}; evidence: `ray-unlearn requests show ID`)")


@requests_app.command()
def process(
    limit: Annotated[int, typer.Option("--limit", "-n", help="Requests to claim for this batch (1-300).")] = 8,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the serving "
                      "version's stored settings, else the built-in defaults).")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override a config key: train.lr=1e-4 (repeatable).")] = [],  # noqa: B006
    store: StoreOpt = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking/registry URI "
                            "(default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Registered model name (default: ray-unlearn-hotfix).",
                     show_default=False)] = None,
    retention: Annotated[str, typer.Option("--retention", help="delete: purge a request's image once it is done "
                         "(its evidence stays); keep: keep it.")] = "delete",
    lease_seconds: Annotated[float, typer.Option("--lease-seconds", help="Lease on each claimed request; must "
                             "exceed the renewal period and any pause of this process.")] = 900.0,
    renew_seconds: Annotated[Optional[float], typer.Option("--renew-seconds", help="Renewal period of the leases "
                             "(default: a third of --lease-seconds).", show_default=False)] = None,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Claims of one request before it is failed "
                            "(at least 1).")] = 5,
    train_unproduced: Annotated[bool, typer.Option("--train-unproduced", help="Operator override for this batch: "
                                "train on requests the model does not produce (recorded in each one's evidence; "
                                "for one request prefer `requeue --train-anyway`).")] = False,
    gpu: Annotated[bool, typer.Option("--gpu", help="Run the batch as a Ray task on a GPU worker "
                   "(RAY_ADDRESS or a local Ray) instead of in this process.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Process a batch: the oldest pending requests, one after another, into one new version.

    Starts from the serving version, checks that the model produces each picture, unlearns it,
    verifies it (and every earlier one), checks integrity against the base model, then registers
    the version and moves the alias. Exit status: 0 ok, 1 a request failed or was not produced,
    2 bad usage, 3 a gate refused (requests went back to pending), 4 storage/MLflow/Ray trouble."""
    from ray_unlearn.requests.process import check_options, run_batch

    _ensure_log_output()
    with _errors():
        check_options(limit=limit, retention=retention, lease_seconds=lease_seconds, renew_seconds=renew_seconds,
                      max_attempts=max_attempts)
        _queue(store)  # a store that does not exist is a typo, not an empty queue
        out = run_batch(store=_uri(store), limit=limit, config_path=str(config) if config else None,
                        overrides=list(set_), tracking_uri=tracking_uri, model_name=model, retention=retention,
                        lease_seconds=lease_seconds, renew_seconds=renew_seconds, max_attempts=max_attempts,
                        train_unproduced=train_unproduced, gpu=gpu)
    if json_out:
        typer.echo(json.dumps(out.public()))  # one line: the last line of a job's log
    else:
        _summary(out)
    sys.stdout.flush()
    raise typer.Exit(out.exit_code)
