"""``medai pacs``: receive studies from a PACS, follow an Orthanc, send results, report status."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import typer

from medai import config, home
from medai.cli._common import EXIT_FAILURE, emit

log = logging.getLogger("medai.pacs")


class _JsonFormatter(logging.Formatter):
    """One JSON object per log line (messages carry no patient identifiers)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        return json.dumps(entry)


def _setup_logging(log_json: bool, verbose: bool) -> None:
    """Service logging, and this process named "pacs" for the egress guard and the audit actor."""
    from medai.compliance import egress

    egress.install_for_entry_point("pacs")
    root = logging.getLogger("medai")
    if verbose or root.level > logging.INFO:
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if log_json:
        for handler in root.handlers:
            if not isinstance(handler, logging.NullHandler):
                handler.setFormatter(_JsonFormatter())
    from medai.pacs._audit import quiet_pynetdicom

    quiet_pynetdicom()
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _stop_on_signals() -> threading.Event:
    """An event that SIGTERM/SIGINT set. Installed before a service says it is ready, so a
    supervisor that stops it at once gets a clean shutdown, not the default death."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def _service(name: str, threads: list[tuple[str, Callable[[], None], Callable[[], None]]],
             detail: dict[str, Any], *, start_recorded: bool = False, stop: threading.Event | None = None) -> None:
    """Run long-lived loops in threads until SIGTERM/SIGINT, then stop them in order.

    ``start_recorded``: the caller wrote the Application Start record itself,
    before its service began taking requests. ``stop``: the caller's event from
    :func:`_stop_on_signals`, when it installed the handlers before announcing itself."""
    from medai.pacs import _audit

    if not start_recorded:
        _audit.record("application_start", detail={"service": name, **detail})
    stop = stop or _stop_on_signals()
    running = []
    for label, target, _halt in threads:
        t = threading.Thread(target=target, name=f"medai-{label}", daemon=True)
        t.start()
        running.append(t)
    try:
        while not stop.is_set() and all(t.is_alive() for t in running):
            stop.wait(0.5)
    finally:
        for _label, _target, halt in threads:
            halt()
        for t in running:
            t.join(timeout=30)
        try:
            _audit.record("application_stop", detail={"service": name})
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.error("could not audit the stop: %s", exc)
        log.info("%s stopped", name)


def _state_file() -> Path:
    return home.pacs_dir() / "listener.json"


def _csv(values: list[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    return tuple(v.strip() for item in values for v in item.split(",") if v.strip())


def register(app: typer.Typer) -> None:
    pacs = typer.Typer(help="Receive studies from a PACS (C-STORE SCP) or follow an Orthanc; run the routed "
                       "models when a study is complete; send DICOM SEG/SR results back.",
                       no_args_is_help=True)
    app.add_typer(pacs, name="pacs")

    @pacs.command("listen")
    def listen(
        ae_title: str = typer.Option(None, "--ae-title", "-a", help="Our AE title (setting pacs.ae_title)."),
        port: int = typer.Option(None, "--port", "-p", help="TCP port (setting pacs.port)."),
        address: str = typer.Option(None, "--address", help="Bind address (setting pacs.address, 127.0.0.1)."),
        allow_remote: bool = typer.Option(None, "--allow-remote/--loopback-only",
                                          help="Permit a non-loopback bind address (audited)."),
        allowed_callers: list[str] = typer.Option(None, "--allow-caller",
                                                  help="Calling AE title allowed (repeat; default: any)."),
        allowed_hosts: list[str] = typer.Option(None, "--allow-host", help="Peer address allowed (repeat)."),
        max_pdu: int = typer.Option(None, "--max-pdu", help="Largest PDU accepted in bytes (0: unlimited)."),
        acse_timeout: float = typer.Option(None, "--acse-timeout", help="Association negotiation timeout (s)."),
        dimse_timeout: float = typer.Option(None, "--dimse-timeout", help="DIMSE message timeout (s)."),
        network_timeout: float = typer.Option(None, "--network-timeout", help="Idle association timeout (s)."),
        stable_seconds: float = typer.Option(None, "--stable-seconds",
                                             help="Quiet period before a study counts as complete."),
        destination: str = typer.Option(None, "--destination", "-d",
                                        help="Where results go: AE@host:port or a folder (pacs.destination)."),
        send_policy: str = typer.Option(None, "--send-policy", help="after-review (a clinician accepts each "
                                        "result in the Worklist first) or immediate (pacs.send_policy)."),
        no_worker: bool = typer.Option(False, "--no-worker",
                                       help="Only receive; run `medai pacs worker` separately."),
        log_json: bool = typer.Option(False, "--log-json", help="Structured JSON log lines on stderr."),
    ) -> None:
        """Run the DICOM C-STORE SCP (and the worker) until SIGTERM/Ctrl-C.

        Every acknowledged instance is already on disk (fsynced) under
        MEDAI_HOME/store; studies quiet for --stable-seconds are routed to
        models, and results go to --destination.
        """
        from medai.pacs.scp import Listener, ListenerConfig
        from medai.pacs.worker import Worker, WorkerConfig

        _setup_logging(log_json, False)
        cfg = ListenerConfig.from_config(ae_title=ae_title, port=port, address=address, allow_remote=allow_remote,
                                         allowed_callers=_csv(allowed_callers), allowed_hosts=_csv(allowed_hosts),
                                         max_pdu=max_pdu, acse_timeout=acse_timeout, dimse_timeout=dimse_timeout,
                                         network_timeout=network_timeout)
        cfg.check()
        wcfg = WorkerConfig.from_config(stable_seconds=stable_seconds, destination=destination,
                                        send_policy=send_policy)
        from medai.pacs import _audit

        listener = Listener(cfg)
        worker = None if no_worker else Worker(wcfg, store=listener.store)
        # Recorded before the port opens: no import may precede the start in the trail.
        _audit.record("application_start", detail={"service": "pacs-listen", "ae_title": cfg.ae_title,
                                                   "port": cfg.port})
        try:
            listener.start(block=False)
        except BaseException:
            _audit.record("application_stop", detail={"service": "pacs-listen", "reason": "could not start"})
            raise
        state = {"pid": os.getpid(), "ae_title": cfg.ae_title, "address": cfg.address, "port": listener.port,
                 "started": time.time(), "worker": worker is not None}
        _state_file().parent.mkdir(parents=True, exist_ok=True)
        _state_file().write_text(json.dumps(state))
        stop = _stop_on_signals()
        sys.stdout.write(json.dumps({"event": "listening", **state}) + "\n")
        sys.stdout.flush()
        threads: list[tuple[str, Callable[[], None], Callable[[], None]]] = [
            ("scp", listener.wait, listener.stop)]
        if worker is not None:
            threads.append(("worker", worker.run, worker.stop))
        try:
            _service("pacs-listen", threads, {}, start_recorded=True, stop=stop)
        finally:
            _state_file().unlink(missing_ok=True)

    @pacs.command("worker")
    def worker_cmd(
        ctx: typer.Context,
        stable_seconds: float = typer.Option(None, "--stable-seconds", help="Quiet period of a complete study."),
        destination: str = typer.Option(None, "--destination", "-d", help="AE@host:port or a folder."),
        send_policy: str = typer.Option(None, "--send-policy", help="after-review or immediate (pacs.send_policy)."),
        once: bool = typer.Option(False, "--once", help="Process what is due, then exit."),
        log_json: bool = typer.Option(False, "--log-json", help="Structured JSON log lines on stderr."),
    ) -> None:
        """Run the job/transfer worker alone (beside `medai pacs listen --no-worker`)."""
        from medai.pacs.worker import Worker, WorkerConfig, run_pending

        _setup_logging(log_json, False)
        wcfg = WorkerConfig.from_config(stable_seconds=stable_seconds, destination=destination,
                                        send_policy=send_policy)
        if once:
            from medai.pacs.queue import PacsDB

            run_pending(wcfg)
            left = PacsDB().status()
            emit(ctx, {"event": "idle", "queue_depth": left["queue_depth"], "jobs": left["jobs"],
                       "transfers": left["transfers"]},
                 lambda d: typer.echo(f"nothing left to do: jobs {d['jobs'] or {}}, transfers {d['transfers'] or {}}"))
            return
        worker = Worker(wcfg)
        stop = _stop_on_signals()
        sys.stdout.write(json.dumps({"event": "working", "pid": os.getpid()}) + "\n")  # like listen, follow-orthanc
        sys.stdout.flush()
        _service("pacs-worker", [("worker", worker.run, worker.stop)], {}, stop=stop)

    @pacs.command("follow-orthanc")
    def follow_orthanc(
        url: str = typer.Option(None, "--url", help="Orthanc REST base URL (setting pacs.orthanc_url)."),
        from_start: bool = typer.Option(False, "--from-start",
                                        help="Process Orthanc's whole change history, not only new changes."),
        send_policy: str = typer.Option(None, "--send-policy", help="after-review or immediate (pacs.send_policy)."),
        log_json: bool = typer.Option(False, "--log-json", help="Structured JSON log lines on stderr."),
    ) -> None:
        """Follow an existing Orthanc: StableStudy in, results uploaded back (POST /instances)."""
        from medai.pacs.orthanc import Follower, OrthancClient, wait_for
        from medai.pacs.queue import PacsDB
        from medai.pacs.store import StudyStore
        from medai.pacs.worker import Worker, WorkerConfig

        _setup_logging(log_json, False)
        if url:
            os.environ["MEDAI_PACS_ORTHANC_URL"] = url  # the worker's upload destination resolves the same URL
        client = OrthancClient.from_config(url)
        wait_for(client)
        store, db = StudyStore(), PacsDB()
        worker = Worker(WorkerConfig.from_config(send_policy=send_policy), store=store, db=db)
        follower = Follower(client, store=store, db=db, on_stable=worker.stabilise,
                            poll_seconds=float(config.get("pacs.orthanc_poll_seconds")))
        if db.get_value(follower.cursor_key) is None and not from_start:
            db.set_value(follower.cursor_key, client.last_change())
        stop = _stop_on_signals()
        sys.stdout.write(json.dumps({"event": "following", "orthanc": client.describe()}) + "\n")
        sys.stdout.flush()
        _service("pacs-follow-orthanc", [("follower", follower.run, follower.stop),
                                         ("worker", worker.run, worker.stop)], {"orthanc": client.describe()},
                 stop=stop)

    @pacs.command("status")
    def status(ctx: typer.Context) -> None:
        """Queue depth, last received instance, failures (no patient data)."""
        from medai.pacs.queue import PacsDB

        data = PacsDB().status()
        listener: dict[str, Any] | None = None
        if _state_file().is_file():
            try:
                listener = json.loads(_state_file().read_text())
                os.kill(int(listener["pid"]), 0)
                listener["running"] = True
            except (OSError, ValueError, KeyError):
                listener = {**(listener or {}), "running": False}
        data["listener"] = listener

        def human(d: dict[str, Any]) -> None:
            last = d["last_received"]
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "never"
            lst = d["listener"]
            state = (f"running (pid {lst['pid']}, {lst['ae_title']} on {lst['address']}:{lst['port']})"
                     if lst and lst.get("running") else "not running")
            typer.echo(f"listener:        {state}")
            typer.echo(f"instances:       {d['instances']} (last received {when})")
            typer.echo(f"studies:         {d['studies'] or {}}")
            typer.echo(f"queue depth:     {d['queue_depth']}  jobs {d['jobs'] or {}}  transfers {d['transfers'] or {}}")
            typer.echo(f"failures:        stores {d['failed_stores']}, rejected associations "
                       f"{d['rejected_associations']}, jobs {d['jobs'].get('failed', 0)}, "
                       f"transfers {d['transfers'].get('failed', 0)}")
            for f in d["recent_failures"]:
                typer.echo(f"  {f['kind']} {f['id']} ({f['what']}): {f['error']}")

        emit(ctx, data, human)

    @pacs.command("send")
    def send(
        ctx: typer.Context,
        paths: list[Path] = typer.Argument(..., exists=True, help="DICOM files or folders to send."),
        to: str = typer.Option(None, "--to", help="AE@host:port, a folder, or 'orthanc' (default: pacs.destination)."),
    ) -> None:
        """Send DICOM files (e.g. a SEG) to the configured destination, audited as Export."""
        from medai.errors import ConfigError
        from medai.pacs.sender import copy_tree_files, parse_destination, send_audited

        target = config.get("pacs.destination", to)
        if not target:
            raise ConfigError("no destination: pass --to AE@host:port or set pacs.destination")
        dest = parse_destination(str(target))
        files = copy_tree_files(list(paths))
        if not files:
            raise typer.Exit(EXIT_FAILURE)
        send_audited(dest, files, study_uid=None)
        emit(ctx, {"sent": len(files), "destination": dest.describe()},
             lambda d: typer.echo(f"sent {d['sent']} file(s) to {d['destination']}"))
