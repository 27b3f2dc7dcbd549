"""Provider and precision chosen per machine, by measurement (``medai doctor --tune``, and first use).

Why: the fastest way to run a graph depends on the machine (an Intel CPU with AMX runs
bf16 OpenVINO kernels several times faster than fp32 onnxruntime; a CPU without
AVX-512 BF16 does not), and a faster precision is only worth having when its answer is
the same. So each candidate (provider x precision) is

1. compiled for real and asked what it actually computes in (a bf16 request that comes
   back fp32 is not a bf16 candidate, see :mod:`medai.inference.backends`);
2. run on **real** validation inputs: the graph inputs the bundle's own pipeline
   produces from a real series (``validation_volume(bundle)`` of the pipeline module;
   brain extraction: the shipped Colin27 demo T1), captured while the pipeline runs on
   the fp32 CPU reference;
3. compared with that fp32 CPU reference: masks (``output > 0``) must reach Dice
   >= ``dice_min`` (card ``[tuning] dice_min``, default 0.995) on every input, and the
   card's own precision table (``[[metrics]]`` rows with ``graph`` and ``precision``,
   measured on the bundle's wider real evaluation data) must not record that precision
   below ``dice_min`` (:func:`card_evidence`); a promptable model is judged on every
   prompt of its pipeline's ``validation_prompt`` (LiteMedSAM: 7 slices, three planes);
4. timed on the same real-shaped inputs (best of ``repeats`` after a warm-up run).

The fastest candidate that passes wins. The verdict is stored in
``$MEDAI_HOME/cache/tuning.json`` keyed by the graph file's SHA-256 and this CPU's
features (model name + the instruction-set flags that change kernels); each row also
names the runtime and version that produced it, and :func:`preferred` ignores a verdict
whose runtime version has changed since. A failing candidate is kept in the table with
its reason and is never chosen.

First use: a run that finds no verdict for its graphs (and has something to choose
between: an accelerator runtime besides ONNX Runtime's CPU provider) says so and starts
``medai doctor --tune --model ID --seconds N`` in the background at the lowest CPU
priority, after its own work is done (setting ``tune_on_first_use``: ``background``, the
default; ``upfront`` tunes in the run's own process before it starts, for a batch that
would rather wait once; ``off``). Either way the tuning is bounded by
:data:`FIRST_USE_SECONDS`: candidates the bound leaves untried are recorded as not
measured and never chosen (the fp32 CPU row is always measured).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from medai import config, home
from medai.errors import BackendError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Volume
    from medai.inference.bundle import Bundle

log = logging.getLogger("medai.inference")

DICE_MIN = 0.995
#: CPU flags that change which kernels a runtime picks (and so speed and rounding).
_FEATURE_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                  "amx_tile", "amx_bf16", "amx_int8")

Feeds = dict[str, np.ndarray]


def cpu_features() -> str:
    """``<model name> | flag,flag,...``: the part of this CPU a tuning verdict depends on."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    return f"{model} | {','.join(f for f in _FEATURE_FLAGS if f in flags)}"


def _cpu_key() -> str:
    return hashlib.sha256(cpu_features().encode()).hexdigest()[:16]


def cache_path() -> Path:
    return home.cache_dir() / "tuning.json"


@dataclass(frozen=True)
class Candidate:
    """One measured way to run a graph."""

    provider: str
    precision: str
    runtime: str
    passed: bool
    #: Best wall time of one run on the real-shaped input, milliseconds (None: did not run).
    ms: float | None
    #: Lowest Dice over the validation inputs of ``output > 0`` against the fp32 CPU reference.
    dice: float | None
    max_abs_diff: float | None
    reason: str = ""
    #: The graph file measured (a bundle may offer e.g. a quantised file beside the fp32 one).
    file: str = ""
    #: Resident memory the session added at its peak (compile + one run), MiB: what the
    #: planner predicts this graph with on this machine (:mod:`medai.inference.planner`).
    peak_mb: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The tuning of one graph on this machine."""

    model: str
    graph: str
    file_sha256: str
    cpu: str
    dice_min: float
    validation: str
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None = None
    tuned_at: float = field(default_factory=time.time)
    #: How the verdict was reached (:data:`METHOD`); a verdict of an older method is not used.
    method: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Verdict":
        cands = tuple(Candidate(**c) for c in data["candidates"])
        chosen = Candidate(**data["chosen"]) if data.get("chosen") else None
        return cls(**{**data, "candidates": cands, "chosen": chosen})


#: The tuning method. 2: a promptable model is judged on every prompt its pipeline's
#: ``validation_prompt`` gives (LiteMedSAM: 7 slices in three planes), not on one slice; a
#: verdict of method 1 may have passed a precision on one slice's luck, so it is tuned again.
METHOD = 2

#: Time bound of tuning on first use (seconds; the 256^3 brain graph in four variants takes
#: about a minute on an idle 2-core machine).
FIRST_USE_SECONDS = 300.0

#: A reduced precision must be at least this much faster than the best fp32 candidate to be
#: chosen: within timing noise, the exact answer wins.
MARGIN = 0.05


def choose(candidates: Iterable[Candidate]) -> Candidate | None:
    """The fastest candidate that passed; a failing one is never chosen, however fast. A reduced
    precision is chosen only when it beats the fastest passing fp32 by :data:`MARGIN`."""
    passing = [c for c in candidates if c.passed and c.ms is not None]
    if not passing:
        return None
    best = min(passing, key=lambda c: (c.ms, c.precision != "fp32"))
    exact = [c for c in passing if c.precision == "fp32"]
    if best.precision != "fp32" and exact:
        best_exact = min(exact, key=lambda c: c.ms)  # type: ignore[arg-type, return-value]
        if best.ms > best_exact.ms * (1.0 - MARGIN):  # type: ignore[operator]
            return best_exact
    return best


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = float(np.count_nonzero(a & b))
    total = float(np.count_nonzero(a) + np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * inter / total


def _precisions_for(provider: str) -> tuple[str, ...]:
    from medai.inference import backends

    if provider in backends.OV_PROVIDERS:
        return ("fp32", "bf16", "fp16")
    return ("fp32",)


class _Recorder:
    """Wraps a raw runtime session: records every input it is fed (and what it answered)."""

    def __init__(self, raw: Any, sink: list[Feeds], answers: list[list[np.ndarray]]) -> None:
        self._raw, self._sink, self._answers = raw, sink, answers

    def run(self, names: Any, feeds: Feeds) -> Any:
        self._sink.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        out = self._raw.run(names, feeds)
        self._answers.append([np.array(o, copy=True) for o in out])
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def capture_inputs(bundle: "Bundle", volume: "Volume", *, threads: int | None = None,
                   prompt: Any = None) -> dict[str, list[Feeds]]:
    """Graph inputs the bundle's pipeline feeds each graph when it runs on ``volume`` (CPU fp32).

    Also finds which graph's output another graph is fed unchanged (LiteMedSAM: the
    encoder's embedding goes to the decoder); the result's ``"_chains"`` entry maps such a
    producer to ``[(consumer key, consumer input name, producer run, consumer run), ...]``."""
    from medai.inference import backends, planner
    from medai.inference.pipeline import PipelineContext
    from medai.inference.run import load_pipeline
    from medai.inference.steps import StepRunner

    captured: dict[str, list[Feeds]] = {}
    answers: dict[str, list[list[np.ndarray]]] = {}
    sessions: dict[tuple[str, str], backends.Session] = {}

    def session_for(b: "Bundle", key: str) -> backends.Session:
        if (b.id, key) not in sessions:
            real = backends.get_session(b, key, device="cpu", threads=threads, precision="fp32")
            label = key if b.id == bundle.id else f"{b.id}:{key}"
            sink, said = captured.setdefault(label, []), answers.setdefault(label, [])
            sessions[(b.id, key)] = backends.Session(real.key, real.file_sha256, real.provider, real.threads,
                                                     real.input_name, real.output_name,
                                                     _Recorder(real._session, sink, said), precision="fp32")
        return sessions[(b.id, key)]

    ctx = PipelineContext(bundle=bundle, session=lambda key: session_for(bundle, key),
                          plan=planner.plan(bundle, volume.shape), steps=StepRunner(bundle.card),
                          session_for=session_for, prompt=prompt)
    ctx.steps.bind(ctx)
    load_pipeline(bundle).run(volume, ctx)
    own = {k: v for k, v in captured.items() if ":" not in k}
    chains: dict[str, list[tuple[str, str, int, int]]] = {}
    for producer in own:
        for consumer, feeds_list in own.items():
            if consumer == producer:
                continue
            for j, feeds in enumerate(feeds_list):
                for name, value in feeds.items():
                    for i, outs in enumerate(answers[producer]):
                        if any(o.shape == value.shape and np.array_equal(o, value) for o in outs):
                            chains.setdefault(producer, []).append((consumer, name, i, j))
    return {**own, "_chains": chains}  # type: ignore[dict-item]


def validation_inputs(bundle: "Bundle", *, threads: int | None = None) -> tuple[str, dict[str, list[Feeds]]]:
    """(what the data is, graph key -> real inputs) for ``bundle``; empty when its pipeline
    names no validation series (then the graph is not tuned and runs fp32). A promptable
    pipeline also defines ``validation_prompt(bundle)``."""
    import importlib

    module = importlib.import_module(f"medai.inference.pipelines.{bundle.card.pipeline}")
    source: Callable[["Bundle"], tuple[str, "Volume"]] | None = getattr(module, "validation_volume", None)
    if source is None:
        return "none", {}
    name, volume = source(bundle)
    prompts = getattr(module, "validation_prompt", lambda b: None)(bundle)
    if not isinstance(prompts, (list, tuple)):  # one prompt, or None for a model without prompts
        prompts = [prompts]
    merged: dict[str, list[Feeds]] = {}
    chains: dict[str, list[tuple[str, str, int, int]]] = {}
    for prompt in prompts:  # several prompts: their inputs add up, their chains are renumbered
        captured = capture_inputs(bundle, volume, threads=threads, prompt=prompt)
        links: dict[str, list[tuple[str, str, int, int]]] = captured.pop("_chains", {})  # type: ignore[assignment]
        offset = {k: len(merged.get(k, [])) for k in captured}
        for producer, found in links.items():
            chains.setdefault(producer, []).extend(
                (consumer, input_name, i + offset[producer], j + offset[consumer])
                for consumer, input_name, i, j in found)
        for k, feeds in captured.items():
            merged.setdefault(k, []).extend(feeds)
    return name, {**merged, "_chains": chains}  # type: ignore[dict-item]


def _time_and_compare(session: Any, inputs: Sequence[Feeds], output: str, refs: Sequence[np.ndarray],
                      repeats: int) -> tuple[float, float, float]:
    """(best ms on the first input, lowest Dice, largest |diff|) of ``session`` against ``refs``.

    Best of ``repeats``, not the median: on a shared machine other load only ever adds
    time, so the minimum is the closest to what the candidate itself costs."""
    dice, diff = 1.0, 0.0
    for feeds, ref in zip(inputs, refs):
        out = session.run([output], feeds)[0]
        dice = min(dice, _dice(ref > 0, out > 0))
        diff = max(diff, float(np.max(np.abs(ref.astype(np.float32) - out.astype(np.float32)))))
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        session.run([output], inputs[0])
        times.append(time.perf_counter() - t0)
    return float(np.min(times)) * 1000.0, dice, diff


def tune_graph(bundle: "Bundle", key: str, inputs: Sequence[Feeds], *, providers: Sequence[str] | None = None,
               threads: int | None = None, repeats: int = 3, validation: str = "",
               extra: Sequence[tuple[str, str, Path]] = (), save: bool = True,
               downstream: Sequence[tuple[str, str, Feeds, int]] = (), deadline: float | None = None) -> Verdict:
    """Measure every provider x precision for graph ``key`` on ``inputs`` and keep the fastest that passes.

    ``extra``: further (provider, precision, graph file) candidates, e.g. a quantised
    graph (never chosen unless it passes like every other candidate).
    ``downstream``: when this graph's output is not a mask but is fed to another graph
    (an image embedding), judge it by that graph's mask instead: ``(consumer key, its input
    name, its captured feeds, index into inputs)``; the consumer runs as fp32 CPU on the
    candidate's output and its mask is compared with the all-fp32 mask.
    ``deadline``: a ``time.monotonic()`` value; candidates not started by then are recorded
    as not measured (the fp32 CPU row always is measured).
    """
    from medai.inference import backends, planner

    if not inputs:
        raise BackendError(f"model {bundle.id}: no validation inputs for graph {key!r}: cannot tune")
    spec = bundle.card.graphs[key]
    digest = bundle.card.files[spec.file]
    n = backends.thread_count(threads)
    dice_min = float(bundle.card.raw.get("tuning", {}).get("dice_min", DICE_MIN))
    providers = list(providers if providers is not None else backends.available_providers())
    reference = backends._make(bundle.file(spec.file), digest, key, spec.input, spec.output, backends.CPU, n,
                               memory_arena=spec.memory_arena)
    refs = [reference._session.run([spec.output], feeds)[0] for feeds in inputs]
    judge = _downstream_judge(bundle, downstream, n) if downstream else None
    plan = [(p, prec, bundle.file(spec.file)) for p in providers for prec in _precisions_for(p)] + list(extra)
    rows: list[Candidate] = []
    for provider, precision, path in plan:
        runtime = backends.runtime_version(provider)
        # Past the bound, only the fp32 CPU row is still measured (in its place in the order:
        # measured straight after the reference session, the allocator's reuse of that run's
        # freed memory would hide most of its peak, which the planner predicts from).
        reference_row = (provider, precision, path) == (backends.CPU, "fp32", bundle.file(spec.file))
        if deadline is not None and not reference_row and time.monotonic() > deadline:
            rows.append(Candidate(provider, precision, runtime, False, None, None, None,
                                  "not measured: the tuning time bound was reached", path.name))
            continue
        base = planner.resident_bytes()
        planner.reset_peak_rss()
        try:
            session = backends._make(path, digest, key, spec.input, spec.output, provider, n,
                                     memory_arena=spec.memory_arena, precision=precision, spec=spec)
            session.run_feeds(inputs[0], [spec.output])  # warm-up: first-run allocations are not the steady state
            peak_mb = round(max(0, planner.peak_rss_bytes() - base) / planner.MB, 1)
            ms, dice, diff = _time_and_compare(session._session, inputs, spec.output, refs, repeats)
            if judge is not None:
                dice = judge(session._session, inputs, spec.output)
        except BackendError as exc:
            rows.append(Candidate(provider, precision, runtime, False, None, None, None, str(exc), path.name))
            continue
        passed = dice >= dice_min
        reason = "" if passed else f"Dice {dice:.4f} against fp32 CPU is below {dice_min:g}"
        evidence = card_evidence(bundle, key, precision)
        if passed and evidence is not None and evidence[0] < dice_min:
            passed = False
            reason = (f"Dice {dice:.4f} here, but the card's own evaluation on {evidence[1]} real inputs "
                      f"gives {evidence[0]:.4f}, below {dice_min:g}")
        rows.append(Candidate(provider, precision, runtime, passed, round(ms, 1), round(dice, 6), diff, reason,
                              path.name, peak_mb))
        del session
    verdict = Verdict(bundle.id, key, digest, cpu_features(), dice_min, validation, tuple(rows), choose(rows),
                      method=METHOD)
    if save:
        _store(verdict)
    return verdict


def card_evidence(bundle: "Bundle", key: str, precision: str) -> tuple[float, int] | None:
    """(lowest Dice against fp32, inputs) that the card's ``[[metrics]]`` precision table gives
    graph ``key`` in ``precision`` on its own real evaluation data, over every provider it
    lists; None when the card has no such row. The tuner's validation inputs are one series;
    the card's table may cover more (LiteMedSAM: 24 slices of a CT and two MRIs), and a
    precision that fails there is never chosen, whatever this machine's validation says."""
    rows = [m for m in bundle.card.metrics if m.get("graph") == key and m.get("precision") == precision
            and isinstance(m.get("value"), (int, float))]
    if not rows:
        return None
    worst = min(rows, key=lambda m: float(m["value"]))
    return float(worst["value"]), int(worst.get("n", 1))


def _downstream_judge(bundle: "Bundle", downstream: Sequence[tuple[str, str, Feeds, int]],
                      threads: int) -> Callable[[Any, Sequence[Feeds], str], float]:
    """Lowest mask Dice of the consumer graph(s) fed a candidate's output, against all-fp32."""
    from medai.inference import backends

    consumers = {}
    for key, _, _, _ in downstream:
        if key not in consumers:
            spec = bundle.card.graphs[key]
            consumers[key] = backends._make(bundle.file(spec.file), bundle.card.files[spec.file], key, spec.input,
                                            spec.output, backends.CPU, threads, memory_arena=spec.memory_arena)
    expected = [consumers[k]._session.run([bundle.card.graphs[k].output], feeds)[0]
                for k, _, feeds, _ in downstream]

    def judge(candidate: Any, inputs: Sequence[Feeds], output: str) -> float:
        worst = 1.0
        for (key, name, feeds, i), ref in zip(downstream, expected):
            produced = candidate.run([output], inputs[i])[0]
            got = consumers[key]._session.run([bundle.card.graphs[key].output], {**feeds, name: produced})[0]
            worst = min(worst, _dice(ref > 0, got > 0))
        return worst

    return judge


def tune_bundle(bundle: "Bundle", *, threads: int | None = None, repeats: int = 3,
                providers: Sequence[str] | None = None, seconds: float | None = None) -> list[Verdict]:
    """Tune every graph of ``bundle`` on its real validation inputs (none: nothing to tune);
    ``seconds`` bounds the whole tuning (see :func:`tune_graph`'s ``deadline``)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    name, inputs = validation_inputs(bundle, threads=threads)
    chains: dict[str, list[tuple[str, str, int, int]]] = inputs.pop("_chains", {})  # type: ignore[assignment]
    return [tune_graph(bundle, key, inputs[key], providers=providers, threads=threads, repeats=repeats,
                       validation=name,
                       downstream=[(c, n, inputs[c][j], i) for c, n, i, j in chains.get(key, [])],
                       deadline=deadline)
            for key in bundle.card.graphs if inputs.get(key)]


def untuned(bundle: "Bundle") -> list[str]:
    """Graphs of ``bundle`` that tuning on first use would measure: no verdict here yet, the
    pipeline names a validation series, and some runtime besides ONNX Runtime's CPU
    provider is installed (with the CPU provider alone there is nothing to choose)."""
    import importlib

    from medai.inference import backends

    module = importlib.import_module(f"medai.inference.pipelines.{bundle.card.pipeline}")
    if getattr(module, "validation_volume", None) is None:
        return []
    missing = [k for k, g in bundle.card.graphs.items() if lookup(bundle.card.files[g.file]) is None]
    if missing and not any(p != backends.CPU for p in backends.available_providers()):
        return []
    return missing


def _lock_path() -> Path:
    return cache_path().with_name("tuning.lock")


def tuning_in_progress() -> int | None:
    """The pid of a first-use tuning process still running, or None."""
    from medai.durable import pid_alive

    try:
        pid = int(_lock_path().read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and pid_alive(pid) else None


def start_background(bundle: "Bundle", *, seconds: float = FIRST_USE_SECONDS) -> int | None:
    """Start ``medai doctor --tune --model <id>`` detached at the lowest CPU priority, unless
    one is already running (one tuner per MEDAI_HOME); returns its pid or None."""
    import subprocess
    import sys

    if tuning_in_progress() is not None:
        return None
    log_file = home.logs_dir() / "tuning.log"
    argv = [sys.executable, "-c", "import sys; from medai.cli import entry; entry(sys.argv[1:])",
            "doctor", "--tune", "--no-parity", "--model", bundle.id, "--seconds", str(int(seconds)), "-q"]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                preexec_fn=lambda: os.nice(19), env={**os.environ, "MEDAI_TUNE_ON_FIRST_USE": "off"})
    _lock_path().write_text(str(proc.pid))
    return proc.pid


def on_first_use(bundle: "Bundle", stage: str, *, threads: int | None = None) -> dict[str, Any] | None:
    """What tuning on first use did for this run (None: nothing); see the module docstring.

    A run calls this twice: ``stage="before"`` its sessions are made (``upfront`` tunes
    then, bounded, so this very run uses the verdict) and ``stage="after"`` its own work is
    done (``background`` starts the detached tuner then, so the two never compete for the
    same cores)."""
    mode = str(config.get("tune_on_first_use") or "background").lower()
    if mode not in ("upfront", "background", "off"):
        raise ConfigError(f"tune_on_first_use must be background, upfront or off, not {mode!r}")
    if mode == "off" or (mode == "upfront") != (stage == "before"):
        return None
    graphs = untuned(bundle)
    if not graphs:
        return None
    if mode == "upfront":
        log.warning("%s: this machine is not tuned for %s yet; tuning now (at most %.0f s)",
                    bundle.id, ", ".join(graphs), FIRST_USE_SECONDS)
        t0 = time.monotonic()
        tune_bundle(bundle, threads=threads, seconds=FIRST_USE_SECONDS)
        return {"state": "tuned up front", "graphs": graphs, "seconds": round(time.monotonic() - t0, 1)}
    running = tuning_in_progress()
    pid = running or start_background(bundle)
    log.warning("%s: this machine is not tuned for %s yet, so this run used fp32; %s (lowest priority, at "
                "most %.0f s); later runs use the fastest precision that passes", bundle.id, ", ".join(graphs),
                f"tuning is already running (pid {running})" if running else f"tuning in the background (pid {pid})",
                FIRST_USE_SECONDS)
    return {"state": "tuning in the background", "pid": pid, "graphs": graphs, "bound_s": FIRST_USE_SECONDS}


def _load() -> dict[str, Any]:
    path = cache_path()
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def _store(verdict: Verdict) -> None:
    data = _load()
    data[f"{verdict.file_sha256}|{_cpu_key()}"] = verdict.as_dict()
    path = cache_path()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def verdicts() -> list[Verdict]:
    """Every stored verdict for this CPU (for ``medai doctor``)."""
    key = _cpu_key()
    found = (Verdict.from_dict(v) for k, v in _load().items() if k.endswith(f"|{key}"))
    return [v for v in found if v.method >= METHOD]


def lookup(file_sha256: str) -> Verdict | None:
    data = _load().get(f"{file_sha256}|{_cpu_key()}")
    verdict = Verdict.from_dict(data) if data else None
    return verdict if verdict is not None and verdict.method >= METHOD else None


def measured_peak_bytes(file_sha256: str, *, cpu_only: bool = False) -> int | None:
    """Peak memory the tuned (chosen) session of this graph file added on this machine, or None;
    ``cpu_only``: the ONNX Runtime CPU fp32 row instead (a run with ``--device cpu``)."""
    from medai.inference.backends import CPU

    verdict = lookup(file_sha256)
    if verdict is None:
        return None
    row = verdict.chosen
    if cpu_only:
        row = next((c for c in verdict.candidates if c.provider == CPU and c.precision == "fp32"), None)
    return int(row.peak_mb * 1024 * 1024) if row is not None and row.peak_mb is not None else None


def preferred(bundle: "Bundle", key: str, providers: Sequence[str], threads: int) -> tuple[str, str] | None:
    """The tuned (provider, precision) for graph ``key`` when it is among ``providers`` and was
    measured with the runtime version installed now; otherwise None (the run uses fp32)."""
    from medai.inference import backends

    verdict = lookup(bundle.card.files[bundle.card.graphs[key].file])
    chosen = verdict.chosen if verdict else None
    if chosen is None or chosen.provider not in providers:
        return None
    try:
        if backends.runtime_version(chosen.provider) != chosen.runtime:
            return None
    except ImportError:
        return None
    return chosen.provider, chosen.precision


__all__ = ["Candidate", "Verdict", "capture_inputs", "choose", "cpu_features", "preferred", "tune_bundle",
           "tune_graph", "validation_inputs", "verdicts"]
