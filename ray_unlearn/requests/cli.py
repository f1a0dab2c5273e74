"""`ray-unlearn requests ...`: submit, list and inspect deletion requests (mounted by ray_unlearn.cli)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

DEFAULT_STORE = "./ray_unlearn_store"

requests_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deletion requests ('your model generates my face: remove it'): submit, list, show. "
    "They wait in a durable queue (a local folder or s3://bucket/prefix) until a processor takes them.",
)

StoreOpt = Annotated[Optional[str], typer.Option(
    "--store", help=f"Store URI: a folder or s3://bucket/prefix (default: $RAY_UNLEARN_STORE or {DEFAULT_STORE})",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextmanager
def _errors():
    from ray_unlearn.requests.models import RequestError
    from ray_unlearn.storage import NotFoundError, StorageError

    try:
        yield
    except (RequestError, StorageError, NotFoundError, ValueError) as err:
        _fail(str(err))


def _queue(store: str | None):
    from ray_unlearn.requests.queue import Queue
    from ray_unlearn.storage import open_store

    return Queue(open_store(store or os.environ.get("RAY_UNLEARN_STORE") or DEFAULT_STORE))


def _safe(value) -> str:
    # whatever is in the store is shown, never interpreted by the terminal
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in str(value))


def _line(rec) -> str:
    note = f"  {_safe(rec.note.splitlines()[0])[:60]}" if rec.note else ""
    return f"{rec.id}  {rec.state:<8} {rec.created_at:%Y-%m-%d %H:%M:%S}  {rec.width}x{rec.height} {rec.mode}{note}"


@requests_app.command()
def submit(
    image: Annotated[Path, typer.Argument(help="Image of the output to remove (PNG, JPEG, WEBP, BMP, TIFF).")],
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the base model that produced it, if known.")] = None,
    note: Annotated[Optional[str], typer.Option("--note", help="Free text for the operators (plain text).")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check an image and queue a deletion request for it (a picture already queued is not added twice)."""
    with _errors():
        rec, created = _queue(store).submit(image, seed=seed, note=note)
    if json_out:
        typer.echo(json.dumps({"created": created, "record": rec.public()}, indent=2))
    elif created:
        typer.echo(f"submitted {rec.id} ({rec.width}x{rec.height} {rec.mode}); state: {rec.state}")
    else:
        typer.echo(f"already submitted as {rec.id}; state: {rec.state}")


@requests_app.command("list")
def list_(
    state: Annotated[Optional[str], typer.Option("--state", help="pending | claimed | done | failed | invalid")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List requests, oldest first."""
    with _errors():
        records = _queue(store).list(state)
    if json_out:
        typer.echo(json.dumps([r.public() for r in records], indent=2))
        return
    for rec in records:
        typer.echo(_line(rec))
    if not records:
        typer.echo("no requests" + (f" in state {state}" if state else ""))


@requests_app.command()
def show(
    request_id: Annotated[str, typer.Argument(metavar="ID", help="Request id (req-...).")],
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """A request: its record, evidence and ledger."""
    with _errors():
        q = _queue(store)
        rec, ledger = q.get(request_id), q.ledger(request_id)
    if json_out:
        typer.echo(json.dumps({"record": rec.public(), "ledger": ledger}, indent=2))
        return
    data = rec.public()
    evidence = data.pop("evidence")
    for key, value in data.items():
        typer.echo(f"{key}: {_safe(value)}")
    typer.echo("evidence:" + ("" if evidence else " (none yet)"))
    for key, value in evidence.items():
        if key == "descriptor" and isinstance(value, dict) and "b64" in value:  # 1.4 kB of base64: say what it is
            value = {**value, "b64": f"<{len(str(value['b64']))} base64 chars>"}
        typer.echo(f"  {_safe(key)}: {_safe(json.dumps(value))}")
    typer.echo("ledger:")
    for e in ledger:
        who = f" by {_safe(e['holder'])}" if e.get("holder") else ""
        why = f"  ({_safe(e['reason'])})" if e.get("reason") else ""
        typer.echo(f"  #{e['seq']} {e['at']}  {e['event']}: {e['from'] or '-'} -> {e['to']}{who}{why}")


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


@requests_app.command("purge-image")
def purge_image(request_id: Annotated[str, typer.Argument(metavar="ID")], store: StoreOpt = None) -> None:
    """Delete the stored image of a finished request (record, evidence and ledger stay)."""
    with _errors():
        rec = _queue(store).purge_image(request_id)
    typer.echo(f"{rec.id}: image purged; state {rec.state}")


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
    lease_seconds: Annotated[float, typer.Option("--lease-seconds", help="Lease on each claimed request, "
                             "renewed every third of it; must exceed any pause of this process.")] = 900.0,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Claims of one request before it is failed.")] = 5,
    gpu: Annotated[bool, typer.Option("--gpu", help="Run the batch as a Ray task on a GPU worker "
                   "(RAY_ADDRESS or a local Ray) instead of in this process.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Process a batch: the oldest pending requests, one after another, into one new version.

    Starts from the serving version, verifies each request (and every earlier one), checks integrity
    against the base model, then registers the version and moves the alias. Exit status 3: some
    requests went back to pending."""
    import sys
    from datetime import datetime

    from ray_unlearn.requests.process import run_batch

    def log(msg: str) -> None:  # timestamped: these lines end up in cron and job logs
        typer.echo(f"{datetime.now():%H:%M:%S} {_safe(msg)}", err=json_out)

    with _errors():
        from ray_unlearn.config import ConfigError
        from ray_unlearn.requests.lineage import LineageError

        try:
            out = run_batch(store=store or os.environ.get("RAY_UNLEARN_STORE") or DEFAULT_STORE, limit=limit,
                            config_path=str(config) if config else None, overrides=list(set_),
                            tracking_uri=tracking_uri, model_name=model, retention=retention,
                            lease_seconds=lease_seconds, max_attempts=max_attempts, gpu=gpu, log=log)
        except (ConfigError, LineageError) as err:
            _fail(str(err))
    if json_out:
        typer.echo(json.dumps(out.public()))  # one line: the last line of a job's log
    else:
        typer.echo(out.summary())
    sys.stdout.flush()
    raise typer.Exit(out.exit_code)
