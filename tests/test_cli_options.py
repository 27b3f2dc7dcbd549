"""Every command takes ``--json`` (and ``-v``, ``-q``) after its name as well as before,
and every ``--help`` reads as sentences at any terminal width.

The command list comes from the click tree itself, so a new command without a case
here fails :func:`test_every_command_has_a_json_case`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import typer
from typer.testing import CliRunner

from medai.cli import app
from medai.cli._common import MedaiGroup, walk
from medai.data import demo_t1_dir

REPO = Path(__file__).resolve().parents[1]
DEMO = demo_t1_dir()


def _tree() -> dict[tuple[str, ...], Any]:
    return dict(walk(typer.main.get_command(app)))


def _leaves() -> set[tuple[str, ...]]:
    return {path for path, cmd in _tree().items() if path and not getattr(cmd, "commands", None)}


@dataclass(frozen=True)
class Case:
    """How to run one command for real: steps before it, its arguments (``--json`` is
    appended after them), the exit codes it may end with, and a check of its JSON."""

    args: Callable[[Path], list[str]]
    check: Callable[[Any], bool]
    exit_codes: tuple[int, ...] = (0,)
    setup: Callable[[Path], list[list[str]]] = field(default=lambda tmp: [])
    serves: bool = False  # long-running: read its first stdout line, then stop it


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir(exist_ok=True)
    return tmp / "empty"


def _error(kind: str) -> Callable[[Any], bool]:
    return lambda d: d["error"]["type"] == kind and d["error"]["exit_code"] == 1 and d["error"]["message"]


CASES: dict[tuple[str, ...], Case] = {
    # An empty study folder: indexed, nothing to run, audit verified, attestation signed (exit 1: no run).
    ("demo",): Case(lambda t: ["demo", "--study", str(_empty(t)), "--out", str(t / "out")],
                    lambda d: d["index"]["studies"] == 0 and d["audit"]["ok"] and d["attestation"]["path"],
                    exit_codes=(1,)),
    ("index",): Case(lambda t: ["index", str(DEMO)], lambda d: d["instances_indexed"] == 181 and not d["skipped"]),
    ("convert",): Case(lambda t: ["convert", str(DEMO), str(t / "t1.nii.gz")],
                       lambda d: d["shape_kji"] == [181, 217, 181]),
    # A real model run is test_inference_cli's; here the error document of a folder without a series.
    ("run",): Case(lambda t: ["run", str(_empty(t)), "-m", "brain-extraction", "-o", str(t / "out")],
                   _error("DicomInputError"), exit_codes=(1,)),
    ("triage",): Case(lambda t: ["triage", str(_empty(t)), "--format", "table"],
                      lambda d: d["studies"] == 0 and d["exit_code"] == 1, exit_codes=(1,)),
    ("deid",): Case(lambda t: ["deid", str(DEMO / "t1_0000.dcm"), str(t / "deid")],
                    lambda d: d["exported"] == 1 and d["failed"] == 0),
    ("ui",): Case(lambda t: ["ui", "--port", str(_free_port())],
                  lambda d: d["event"] == "serving" and d["url"].startswith("http://127.0.0.1:"), serves=True),
    ("doctor",): Case(lambda t: ["doctor", "--no-parity"],
                      lambda d: {m["id"] for m in d["models"]} >= {"brain-extraction"} and d["parity"] == []),
    ("models", "list"): Case(lambda t: ["models", "list"], lambda d: any(r["id"] == "brain-extraction" for r in d)),
    ("models", "show"): Case(lambda t: ["models", "show", "brain-extraction"],
                             lambda d: d["card"]["id"] == "brain-extraction"),
    ("models", "verify"): Case(lambda t: ["models", "verify", "brain-extraction"], lambda d: d[0]["ok"]),
    ("models", "install"): Case(lambda t: ["models", "install", str(REPO / "models" / "brain-extraction")],
                                lambda d: d["id"] == "brain-extraction" and d["origin"] == "installed"),
    ("models", "rollback"): Case(lambda t: ["models", "rollback", "brain-extraction"],
                                 _error("ModelNotFoundError"), exit_codes=(1,)),
    ("models", "import"): Case(lambda t: ["models", "import", str(REPO / "models" / "brain-extraction" / "bbox.onnx"),
                                          "--card", str(_write(t / "card.toml", "name = 'no schema'\n"))],
                               _error("ModelIntegrityError"), exit_codes=(1,)),
    ("models", "import-nnunet"): Case(lambda t: ["models", "import-nnunet", str(t), "--id", "x", "--license",
                                                 "CC-BY-4.0", "--parity-image", str(_write(t / "i.nii.gz", "x"))],
                                      _error("ModelIntegrityError"), exit_codes=(1,)),
    ("models", "import-monai-bundle"): Case(lambda t: ["models", "import-monai-bundle", str(t), "--id", "x",
                                                       "--license", "CC-BY-4.0", "--parity-image",
                                                       str(_write(t / "i.nii.gz", "x"))],
                                            _error("ModelIntegrityError"), exit_codes=(1,)),
    ("models", "trust"): Case(lambda t: ["models", "trust", str(t / "publisher.pem")],
                              lambda d: len(d["key_id"]) > 8,
                              setup=lambda t: [["audit", "keys", "export", "-o", str(t / "publisher.pem")]]),
    ("pacs", "listen"): Case(lambda t: ["pacs", "listen", "--port", str(_free_port()), "--no-worker"],
                             lambda d: d["event"] == "listening" and d["address"] == "127.0.0.1", serves=True),
    ("pacs", "worker"): Case(lambda t: ["pacs", "worker", "--once"],
                             lambda d: d["event"] == "idle" and d["queue_depth"] == 0),
    ("pacs", "follow-orthanc"): Case(lambda t: ["pacs", "follow-orthanc", "--url", _orthanc(t)],
                                     lambda d: d["event"] == "following", serves=True),
    ("pacs", "status"): Case(lambda t: ["pacs", "status"], lambda d: d["instances"] == 0 and d["listener"] is None),
    ("pacs", "send"): Case(lambda t: ["pacs", "send", str(DEMO / "t1_0000.dcm"), "--to", str(t / "dest")],
                           lambda d: d["sent"] == 1),
    ("results", "list"): Case(lambda t: ["results", "list"], lambda d: d == []),
    # Real runs, reviews and sends are the results store's own tests; here an unknown run id.
    ("results", "show"): Case(lambda t: ["results", "show", "no-such-run"], _error("MedaiError"), exit_codes=(1,)),
    ("results", "accept"): Case(lambda t: ["results", "accept", "no-such-run"], _error("MedaiError"),
                                exit_codes=(1,)),
    ("results", "reject"): Case(lambda t: ["results", "reject", "no-such-run"], _error("MedaiError"),
                                exit_codes=(1,)),
    ("results", "send"): Case(lambda t: ["results", "send", "no-such-run"], _error("MedaiError"), exit_codes=(1,)),
    ("audit", "show"): Case(lambda t: ["audit", "show"], lambda d: isinstance(d, list)),
    ("audit", "verify"): Case(lambda t: ["audit", "verify"], lambda d: d["ok"] is True),
    ("audit", "checkpoint"): Case(lambda t: ["audit", "checkpoint"],
                                  lambda d: d["type"] == "medai-audit-checkpoint" and d["signature"]),
    ("audit", "export"): Case(lambda t: ["audit", "export", "--format", "jsonl"],
                              lambda d: isinstance(d, list) and all("event" in r for r in d),
                              setup=lambda t: [["pacs", "status"]]),
    ("audit", "attest"): Case(lambda t: ["audit", "attest"], lambda d: d["statement"]["network"] is not None),
    ("audit", "verify-attestation"): Case(lambda t: ["audit", "verify-attestation", str(t / "att.json")],
                                          lambda d: d["ok"] is True,
                                          setup=lambda t: [["audit", "attest", "-o", str(t / "att.json")]]),
    ("audit", "keys", "export"): Case(lambda t: ["audit", "keys", "export"],
                                      lambda d: d["pem"].startswith("-----BEGIN PUBLIC KEY-----")),
    ("audit", "keys", "rotate"): Case(lambda t: ["audit", "keys", "rotate"],
                                      lambda d: d["old_key_id"] != d["new_key_id"]),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _free_port() -> int:
    from pacs_peers import free_port

    return free_port()


_ORTHANCS: list[Any] = []


def _orthanc(tmp: Path) -> str:
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc not installed")
    from test_pacs_roundtrip import Orthanc

    orthanc = Orthanc(tmp / "orthanc")
    _ORTHANCS.append(orthanc)
    return orthanc.url


@pytest.fixture(autouse=True)
def _stop_orthancs():  # type: ignore[no-untyped-def]
    yield
    while _ORTHANCS:
        _ORTHANCS.pop().stop()


def test_every_command_has_a_json_case() -> None:
    leaves = _leaves()
    assert len(leaves) >= 25
    assert leaves == set(CASES), f"missing: {sorted(leaves - set(CASES))}; stale: {sorted(set(CASES) - leaves)}"


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args, catch_exceptions=True)


def _first_line(args: list[str], medai_home: Path, timeout: float = 120) -> str:
    """Start a serving command as its own process; its first stdout line, then SIGTERM."""
    env = {**os.environ, "MEDAI_HOME": str(medai_home)}
    proc = subprocess.Popen([sys.executable, "-m", "medai", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    try:
        assert got and got[0], f"no stdout line within {timeout} s; stderr: {_stop(proc)[-2000:]}"
        return got[0]
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""


@pytest.mark.parametrize("path", [pytest.param(p, id="-".join(p), marks=[pytest.mark.slow] if CASES[p].serves else [])
                                  for p in sorted(CASES)])
def test_json_after_the_command(path: tuple[str, ...], tmp_path: Path, medai_home: Path) -> None:
    case = CASES[path]
    for step in case.setup(tmp_path):
        done = _invoke(step)
        assert done.exit_code == 0, (step, done.output)
    args = [*case.args(tmp_path), "--json"]
    if case.serves:
        doc = json.loads(_first_line(args, medai_home))
    else:
        result = _invoke(args)
        assert result.exit_code in case.exit_codes, (result.exit_code, result.stdout[-2000:], result.exception)
        doc = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert case.check(doc), json.dumps(doc, indent=1, default=str)[:3000]


def test_shared_options_merge_before_and_after() -> None:
    """-q before the command and -v twice after it: counts add, quiet wins; --json anywhere."""
    import logging

    before = _invoke(["--json", "pacs", "status"])
    after = _invoke(["pacs", "status", "--json"])
    middle = _invoke(["pacs", "--json", "status"])
    assert json.loads(before.stdout) == json.loads(after.stdout) == json.loads(middle.stdout)
    _invoke(["pacs", "status", "-vv"])
    assert logging.getLogger("medai").level == logging.DEBUG
    _invoke(["-v", "pacs", "status", "-q"])
    assert logging.getLogger("medai").level == logging.ERROR
    plain = _invoke(["pacs", "status"])
    assert logging.getLogger("medai").level == logging.WARNING
    assert plain.stdout.startswith("listener:")  # human output without --json


# --- help text ------------------------------------------------------------------

_SEGMENT = re.compile(r"[^\s│]+(?: [^\s│]+)*")  # text with single spaces; 2+ spaces or a border end it
_LIST_ITEM = re.compile(r"^([-*\u2022]|\d+[.)])\s")


def hard_breaks(rendered: str, width: int) -> list[str]:
    """Line breaks inside a sentence that terminal wrapping did not make.

    A break between two rendered lines is a hard break when all of these hold: the
    second line continues the same text column (its first text starts exactly where
    the first line's last text starts, with nothing to its left, as in a wrapped table
    cell or paragraph); the first line's text does not end a sentence or clause
    (``.:;!?``); the second line is not a list item; and the second line's first word
    would have fitted on the first line with at least two columns to spare before the
    panel border (or the terminal edge). A wrapper never leaves such room, so the break
    came from the source text."""
    problems = []
    lines = rendered.splitlines()
    for a, b in zip(lines, lines[1:]):
        right = a.rstrip().rfind("│") if a.rstrip().endswith("│") else width
        first_seg = list(_SEGMENT.finditer(a[:right]))
        next_seg = list(_SEGMENT.finditer(b[:right]))
        if not first_seg or not next_seg:
            continue
        last, nxt = first_seg[-1], next_seg[0]
        if nxt.start() != last.start() or last.group().endswith((".", ":", ";", "!", "?")):
            continue
        if _LIST_ITEM.match(nxt.group()):
            continue
        word = nxt.group().split(" ")[0]
        if last.end() + 1 + len(word) <= right - 3:
            problems.append(f"{a.rstrip()!r} / {b.strip()!r}")
    return problems


def _help(path: tuple[str, ...], columns: int) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("columns", [80, 200])
def test_help_has_no_mid_sentence_breaks(columns: int) -> None:
    found = {}
    for path in _tree():
        text = _help(path, columns)
        assert max(len(line) for line in text.splitlines()) <= columns
        if problems := hard_breaks(text, columns):
            found[" ".join(("medai", *path))] = problems
    assert not found, json.dumps(found, indent=1)


def test_the_break_detector_finds_a_hard_wrapped_docstring() -> None:
    """Without MedaiGroup's reflow, a docstring wrapped in the source keeps its break at
    200 columns (what `medai index --help` showed before); the detector must see it."""

    def index(path: str) -> None:
        """Index DICOM files from headers only: patients > studies > series, plus every
        skipped file with its reason.

        Second paragraph, hard-wrapped in the source the way
        docstrings are."""

    for cls in (None, MedaiGroup):
        demo = typer.Typer(add_completion=False, **({"cls": cls} if cls else {}))
        demo.command()(index)
        demo.command("other")(lambda: None)
        for args in (["--help"], ["index", "--help"]):
            text = CliRunner().invoke(demo, args, env={"COLUMNS": "200"}).stdout
            found = hard_breaks(text, 200)
            if cls is None and args == ["index", "--help"]:
                assert len(found) == 1 and "way" in found[0], found  # first paragraph is joined by typer itself
            elif cls is None:
                assert len(found) == 1 and "plus every" in found[0], found  # the command list keeps it
            else:
                assert found == [], found
