"""ONNX Runtime backends: which execution provider, with which settings, checked against CPU.

Provider policy
---------------
Preference order (first one this onnxruntime build offers wins): TensorRT, CUDA,
ROCm, MIGraphX, OpenVINO, CoreML, DirectML, QNN, CPU. ``--device`` / ``MEDAI_DEVICE``
(``auto``, ``cpu``, ``cuda``, ``tensorrt``, ``rocm``, ``openvino``, ``coreml``,
``directml``, ``qnn``) restricts the choice. Providers that run elsewhere
(``AzureExecutionProvider``, which every onnxruntime wheel lists) are never used:
they are filtered before anything else and refused when named.

Accelerator builds: ``onnxruntime``, ``onnxruntime-gpu``, ``onnxruntime-openvino``,
``onnxruntime-directml``, ``onnxruntime-qnn`` all install the same ``onnxruntime``
module and overwrite each other. The CPU wheel is the base dependency; an extra
such as ``medai[cuda]`` adds ``onnxruntime-gpu`` and the docs say to
``pip uninstall onnxruntime`` first (``docs/models.md``). :func:`runtime_info`
reports which distributions are installed and warns when two are, so a broken mix
is visible in ``medai doctor`` rather than as a mysterious import error.

Small-machine settings
----------------------
intra-op threads = physical cores (or ``MEDAI_THREADS``), inter-op 1 with
sequential execution (3-D U-Nets have no useful graph parallelism and extra
threads only add memory), no spin-waiting of idle pool threads, full graph
optimisation, and the CPU memory arena
*off*: the arena keeps the high-water mark of a 256³ run reserved for the life of
the process, which on an 8-16 GB workstation is worse than the few percent of
speed it buys. A graph whose card sets ``memory_arena = true`` (fixed-size 2-D
graphs run once per slice, e.g. LiteMedSAM's encoder) gets the arena *on* and the
memory-pattern planner off: without the arena every run maps its large buffers anew
and pays the page faults again (LiteMedSAM encoder: about a quarter of its time),
and the pattern planner's one block per run would keep more reserved than the arena
does alone (encoder, measured: 647 vs 365 MiB resident after runs; peak 426 MiB,
against 577 MiB with the default settings). Sessions are cached per (file digest, provider, threads).

Parity
------
The first time a graph runs on a non-CPU provider on this machine, its output on a
fixed seeded input is compared with the CPU reference (CPU provider, graph
optimisations off; ``medai doctor`` on a CPU-only machine checks the optimised CPU
graph against the same reference) (card ``[parity]``:
``max_abs_diff`` on outputs, ``dice_min`` on ``output > 0``). The verdict is cached
in ``$MEDAI_HOME/cache/parity.json`` keyed by model file digest, provider and
onnxruntime version; a failed check makes the run fall back to CPU, and the reason
is recorded in the result.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medai import config
from medai.errors import BackendError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

    from medai.inference.bundle import Bundle
    from medai.inference.card import GraphSpec

log = logging.getLogger("medai.inference")

CPU = "CPUExecutionProvider"
PREFERENCE = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
    "MIGraphXExecutionProvider", "OpenVINOExecutionProvider", "CoreMLExecutionProvider",
    "DmlExecutionProvider", "QNNExecutionProvider", CPU,
)
#: Providers that send tensors off the machine. Never used.
REMOTE = frozenset({"AzureExecutionProvider"})
DEVICES: dict[str, tuple[str, ...]] = {
    "cpu": (CPU,),
    "cuda": ("CUDAExecutionProvider",),
    "tensorrt": ("TensorrtExecutionProvider",),
    "rocm": ("ROCMExecutionProvider", "MIGraphXExecutionProvider"),
    "openvino": ("OpenVINOExecutionProvider",),
    "coreml": ("CoreMLExecutionProvider",),
    "directml": ("DmlExecutionProvider",),
    "qnn": ("QNNExecutionProvider",),
}
_ORT_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
              "onnxruntime-qnn", "onnxruntime-rocm", "onnxruntime-silicon")


def _ort() -> "Any":
    """Import onnxruntime with telemetry off first."""
    from medai.compliance import telemetry

    telemetry.disable()
    import onnxruntime

    try:
        onnxruntime.disable_telemetry_events()
    except AttributeError:
        pass
    return onnxruntime


def available_providers() -> list[str]:
    """Local providers this onnxruntime build offers, in our preference order."""
    offered = [p for p in _ort().get_available_providers() if p not in REMOTE]
    ordered = [p for p in PREFERENCE if p in offered]
    return ordered + [p for p in offered if p not in ordered and p not in REMOTE]


def choose_providers(device: str | None = None) -> list[str]:
    """Providers to try for ``device`` (``auto`` = best available), CPU always last."""
    device = (config.get("device", device) or "auto").lower()
    available = available_providers()
    if device in {p.lower() for p in REMOTE} or device == "azure":
        raise ConfigError(f"device {device!r} runs remotely; medai only uses local execution providers")
    if device == "auto":
        chosen = [p for p in available if p != CPU]
    else:
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r}; use auto or one of {', '.join(DEVICES)}")
        chosen = [p for p in DEVICES[device] if p in available]
        if not chosen and device != "cpu":
            raise BackendError(f"device {device!r} requested but this onnxruntime build offers only "
                               f"{', '.join(available)}; install the matching extra (see docs/models.md)")
    return [p for p in chosen if p != CPU] + [CPU]


def physical_cores() -> int:
    """Physical cores (hyper-threads do not help convolutions), at least 1."""
    try:
        cores = set()
        text = Path("/proc/cpuinfo").read_text()
        phys = core = None
        for line in text.splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
                cores.add((phys, core))
        if cores:
            n = len(cores)
            return max(1, min(n, len(os.sched_getaffinity(0))))
    except (OSError, AttributeError):
        pass
    return max(1, (os.cpu_count() or 2) // 2)


def thread_count(threads: int | None = None) -> int:
    value = int(config.get("threads", threads) or 0)
    return value if value > 0 else physical_cores()


def session_options(threads: int, *, memory_arena: bool = False) -> "ort.SessionOptions":
    """Session options for ``threads`` intra-op threads; ``memory_arena`` as the graph's card says."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = memory_arena
    opts.enable_mem_pattern = not memory_arena
    opts.log_severity_level = 3
    # Idle pool threads sleep instead of spinning: on a shared 2-8 core workstation the
    # spinning burns the cores the UI and the other processes need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


@dataclass
class Session:
    """One ONNX graph ready to run on one provider."""

    key: str
    file_sha256: str
    provider: str
    threads: int
    input_name: str
    output_name: str
    _session: Any = field(repr=False)
    fallback_reason: str | None = None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run the graph on one input array; returns its one output array."""
        return self._session.run([self.output_name], {self.input_name: x})[0]

    def run_feeds(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run a graph with several inputs (e.g. embedding + prompt box); ``outputs`` by name
        (default: the card's output only)."""
        return list(self._session.run(outputs or [self.output_name], feeds))


_cache: dict[tuple[str, str, int], Session] = {}
_lock = threading.Lock()


def _make(path: Path, digest: str, key: str, spec_input: str, spec_output: str, provider: str,
          threads: int, *, reference: bool = False, memory_arena: bool = False) -> Session:
    ort = _ort()
    opts = session_options(threads, memory_arena=memory_arena)
    if reference:  # the plainest execution of the graph: no fusions or layout rewrites
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        with warnings.catch_warnings():  # an unavailable provider is reported through the result
            warnings.simplefilter("ignore")
            raw = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BackendError(f"{path.name}: cannot create an ONNX Runtime session on {provider} ({exc})") from exc
    used = raw.get_providers()[0]
    return Session(key, digest, used, threads, spec_input, spec_output, raw)


def parity_cache_path() -> Path:
    path = config.home() / "cache"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path / "parity.json"


@dataclass(frozen=True)
class ParityResult:
    provider: str
    passed: bool
    max_abs_diff: float
    dice: float
    seconds: float
    cached: bool = False
    reason: str = ""


def _parity_input(spec: "GraphSpec") -> np.ndarray:
    """A fixed, smooth, brain-sized blob with noise: deterministic on every machine."""
    shape = spec.shape
    rng = np.random.default_rng(20240521)
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape[2:]], indexing="ij")
    r2 = sum(g * g for g in grids)
    blob = np.exp(-3.0 * r2).astype(np.float32)
    noisy = blob + 0.05 * rng.standard_normal(blob.shape).astype(np.float32)
    return np.broadcast_to(noisy, shape).astype(np.float32).copy()


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
                "tensor(bool)": np.bool_}


def _parity_feed(session: Any, spec: "GraphSpec") -> dict[str, np.ndarray]:
    """Inputs for every graph input: the blob for the card's main input, seeded values for others
    (e.g. a prompt box): parity compares providers on the same numbers, whatever they mean."""
    rng = np.random.default_rng(7)
    feed = {}
    for arg in session.get_inputs():
        if arg.name == spec.input:
            feed[arg.name] = _parity_input(spec)
            continue
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        dtype = _NUMPY_TYPES.get(arg.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feed[arg.name] = rng.random(shape).astype(dtype)
        else:
            feed[arg.name] = np.zeros(shape, dtype=dtype)
    return feed


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = float(np.logical_and(a, b).sum())
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def parity_check(bundle: "Bundle", key: str, provider: str, *, threads: int | None = None,
                 use_cache: bool = True) -> ParityResult:
    """Compare graph ``key`` on ``provider`` with CPU on the fixed input (cached per machine)."""
    spec = bundle.card.graphs[key]
    digest = bundle.card.files[spec.file]
    ort_version = _ort().__version__
    cache_key = f"{digest}|{provider}|{ort_version}"
    cache_file = parity_cache_path()
    cache: dict[str, Any] = {}
    if use_cache and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}
        if cache_key in cache:
            return ParityResult(**{**cache[cache_key], "cached": True})
    threads = thread_count(threads)
    t0 = time.perf_counter()
    # The reference is CPU without graph optimisations; checking CPU itself (doctor on a
    # CPU-only machine) then tests the optimised graph the runs actually use.
    cpu = _make(bundle.file(spec.file), digest, key, spec.input, spec.output, CPU, threads, reference=True)
    other = _make(bundle.file(spec.file), digest, key, spec.input, spec.output, provider, threads,
                  memory_arena=spec.memory_arena)
    feed = _parity_feed(cpu._session, spec)
    ref = cpu._session.run([spec.output], feed)[0]
    out = other._session.run([spec.output], feed)[0]
    diff = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64))))
    dice = _dice(ref > 0, out > 0)
    tol, dice_min = bundle.card.parity.get("max_abs_diff", 1e-3), bundle.card.parity.get("dice_min", 0.99)
    passed = diff <= tol and dice >= dice_min and other.provider == provider
    if other.provider != provider:
        reason = f"{provider} is not usable here (onnxruntime ran {other.provider} instead)"
    elif not passed:
        reason = (f"{provider} differs from CPU on the parity input: max |diff| {diff:.3g} "
                  f"(limit {tol:g}), Dice {dice:.4f} (min {dice_min:g})")
    else:
        reason = ""
    result = ParityResult(other.provider, passed, diff, dice, time.perf_counter() - t0, False, reason)
    if use_cache:
        cache[cache_key] = {k: v for k, v in result.__dict__.items() if k != "cached"}
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, cache_file)
    return result


def get_session(bundle: "Bundle", key: str, *, device: str | None = None, threads: int | None = None) -> Session:
    """A cached, parity-checked session for graph ``key`` of ``bundle``.

    Tries the chosen providers in order; a provider that cannot start or fails
    its parity check is skipped with the reason kept on the returned session.
    """
    if key not in bundle.card.graphs:
        raise BackendError(f"model {bundle.id}: card has no graph {key!r} (has {', '.join(bundle.card.graphs)})")
    spec = bundle.card.graphs[key]
    digest = bundle.card.files[spec.file]
    n = thread_count(threads)
    reasons: list[str] = []
    for provider in choose_providers(device):
        cache_key = (digest, provider, n)
        with _lock:
            if cache_key in _cache:
                cached = _cache[cache_key]
                if reasons and cached.fallback_reason is None:
                    cached.fallback_reason = "; ".join(reasons)
                return cached
        if provider != CPU:
            try:
                parity = parity_check(bundle, key, provider, threads=n)
            except BackendError as exc:
                reasons.append(str(exc))
                continue
            if not parity.passed:
                reasons.append(parity.reason)
                log.warning("%s: %s; falling back", bundle.id, parity.reason)
                continue
        try:
            session = _make(bundle.file(spec.file), digest, key, spec.input, spec.output, provider, n,
                            memory_arena=spec.memory_arena)
        except BackendError as exc:
            reasons.append(str(exc))
            continue
        session.fallback_reason = "; ".join(reasons) or None
        with _lock:
            _cache[cache_key] = session
        return session
    raise BackendError(f"model {bundle.id}: no execution provider could run {spec.file}: {'; '.join(reasons)}")


def clear_sessions() -> None:
    with _lock:
        _cache.clear()


def runtime_info() -> dict[str, Any]:
    """Installed onnxruntime distributions, version, providers (for doctor and results)."""
    dists = {}
    for name in _ORT_DISTS:
        try:
            dists[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    ort = _ort()
    info: dict[str, Any] = {
        "onnxruntime": ort.__version__, "distributions": dists,
        "providers_offered": list(ort.get_available_providers()),
        "providers_usable": available_providers(), "remote_providers_refused": sorted(REMOTE),
        "threads": thread_count(),
    }
    if len(dists) > 1:
        info["warning"] = (f"several onnxruntime distributions installed ({', '.join(dists)}); they share one "
                           "module and overwrite each other: keep exactly one (see docs/models.md)")
    return info
