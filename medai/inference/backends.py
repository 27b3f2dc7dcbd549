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

OpenVINO
--------
OpenVINO runs through the OpenVINO runtime itself (``pip install 'medai[openvino]'``,
the ``openvino`` wheel), not through ONNX Runtime's OpenVINO provider: the runtime is a
separate module that installs beside the CPU ``onnxruntime`` wheel instead of replacing
it, it reads the same ONNX files, it lets medai set the inference precision (fp32, bf16,
fp16) and read back the precision the plugin actually compiled, and it reaches the
Intel GPU and NPU with the same code. Its providers are named ``OpenVINO:CPU``,
``OpenVINO:GPU`` and ``OpenVINO:NPU`` (devices ``openvino``, ``openvino-cpu``,
``openvino-gpu``, ``openvino-npu``); see docs/models.md for the measurements behind
the choice. Compiled graphs are cached in ``$MEDAI_HOME/cache/openvino`` (weights and
kernels only, never patient data).

What actually ran
-----------------
A provider that cannot start is never passed off as itself: onnxruntime, asked for a
provider whose libraries are missing, quietly creates a CPU session with only a
warning; OpenVINO, asked for bf16 on a CPU without it, compiles fp32. Both are caught
here (the session's providers and the compiled precision are read back) and the run
goes on with what really runs, the reason kept in ``Session.fallback_reason`` and in
``result.json``. Every session carries the provider *and* the precision that produced
its outputs.

Small-machine settings
----------------------
intra-op threads = physical cores (or ``MEDAI_THREADS``), inter-op 1 with
sequential execution (3-D U-Nets have no useful graph parallelism and extra
threads only add memory), no spin-waiting of idle pool threads, full graph
optimisation, and the CPU memory arena *on* with the memory-pattern planner off.
Without the arena every run maps its large buffers anew and pays the page faults again:
the first run of brain extraction's 256³ graph took 2.0 s without it and 1.3 s with it,
with a lower peak (630 against 726 MiB), because the arena reuses chunks within the run.
What the arena holds after a run depends on the card: a graph run once per volume
(``memory_arena = false``, the default) gives it back at the end of every run (ONNX
Runtime's arena shrinkage, a run option), so a long-lived process (the PACS worker, the
UI server) does not keep a 256³ run's high-water mark reserved (resident after the run:
275 against 627 MiB). A graph whose card sets ``memory_arena = true`` (fixed-size 2-D
graphs run once per slice, e.g. LiteMedSAM's encoder) keeps it between runs. The pattern
planner stays off in both: its one block per run would keep more reserved than the arena
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

import concurrent.futures
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medai import config, home
from medai.errors import BackendError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

    from medai.inference.bundle import Bundle
    from medai.inference.card import GraphSpec

log = logging.getLogger("medai.inference")

CPU = "CPUExecutionProvider"
OV_CPU, OV_GPU, OV_NPU = "OpenVINO:CPU", "OpenVINO:GPU", "OpenVINO:NPU"
#: OpenVINO runtime devices medai drives, by provider name.
OV_PROVIDERS = {OV_GPU: "GPU", OV_NPU: "NPU", OV_CPU: "CPU"}
PREFERENCE = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
    "MIGraphXExecutionProvider", OV_GPU, OV_NPU, "OpenVINOExecutionProvider", "CoreMLExecutionProvider",
    "DmlExecutionProvider", "QNNExecutionProvider", OV_CPU, CPU,
)
#: Precisions a session can be asked for. fp32 runs everywhere; the others where the
#: provider compiles them (OpenVINO: bf16/fp16 by inference hint) or where the bundle
#: ships a graph in that precision (int8).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_OV_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
#: Providers that send tensors off the machine. Never used.
REMOTE = frozenset({"AzureExecutionProvider"})
DEVICES: dict[str, tuple[str, ...]] = {
    "cpu": (CPU,),
    "cuda": ("CUDAExecutionProvider",),
    "tensorrt": ("TensorrtExecutionProvider",),
    "rocm": ("ROCMExecutionProvider", "MIGraphXExecutionProvider"),
    "openvino": (OV_GPU, OV_NPU, OV_CPU, "OpenVINOExecutionProvider"),
    "openvino-cpu": (OV_CPU,),
    "openvino-gpu": (OV_GPU,),
    "openvino-npu": (OV_NPU,),
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


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _openvino() -> "Any":
    """Import the OpenVINO runtime with telemetry off first (its model converter, which phones
    home as it is imported, is refused: see medai.compliance.telemetry)."""
    from medai.compliance import telemetry

    telemetry.disable()
    import openvino

    return openvino


@functools.lru_cache(maxsize=1)
def _ov_core() -> "Any":
    """One OpenVINO Core per process (it enumerates devices and loads plugins once)."""
    return _openvino().Core()


def _ov_version() -> str:
    return _openvino().__version__.split("-")[0]


def openvino_devices() -> list[str]:
    """OpenVINO providers present on this machine (``OpenVINO:CPU`` etc.); [] without the extra."""
    if not openvino_installed():
        return []
    try:
        devices = _ov_core().available_devices
    except Exception as exc:  # a broken plugin must not take the CPU path down with it
        log.warning("OpenVINO is installed but cannot list its devices (%s)", exc)
        return []
    kinds = {d.split(".")[0] for d in devices}
    return [p for p, dev in OV_PROVIDERS.items() if dev in kinds]


def ort_version() -> str:
    """The installed onnxruntime's version, from its distribution's metadata when the module is
    not loaded yet (a run on OpenVINO need not load it)."""
    module = sys.modules.get("onnxruntime")
    if module is not None:
        return str(module.__version__)
    for dist in _ORT_DISTS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(_ort().__version__)


def runtime_version(provider: str) -> str:
    """``openvino 2026.4.1`` or ``onnxruntime 1.32.0``: what a verdict about ``provider`` depends on."""
    return f"openvino {_ov_version()}" if provider in OV_PROVIDERS else f"onnxruntime {ort_version()}"


def _ort_offered() -> list[str]:
    """The providers the installed onnxruntime build offers, without importing it when this
    build was seen before: the list is fixed by the build, so it is kept in the cache under
    the identity of the build's extension module (file name, size, modification time).
    Importing onnxruntime only to read this list cost a run on OpenVINO 0.1 s of start-up
    and 17-20 MB of resident memory."""
    if "onnxruntime" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        builds = sorted(p for f in folders for p in (Path(f) / "capi").glob("onnxruntime_pybind11_state*"))
        if builds:
            st = builds[0].stat()
            key = f"{builds[0]}|{st.st_size}|{st.st_mtime_ns}"
            path = home.cache_dir() / "onnxruntime-providers.json"
            try:
                cached = json.loads(path.read_text())
                if cached.get("build") == key and isinstance(cached.get("providers"), list):
                    return [str(p) for p in cached["providers"]]
            except (OSError, ValueError, AttributeError):
                pass
            offered = list(_ort().get_available_providers())
            tmp = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
            try:
                tmp.write_text(json.dumps({"build": key, "providers": offered}))
                os.replace(tmp, path)
            except OSError:  # a read-only home: the list is simply not kept
                pass
            return offered
    return list(_ort().get_available_providers())


def available_providers() -> list[str]:
    """Local providers (onnxruntime's and OpenVINO's devices), in our preference order."""
    offered = [p for p in _ort_offered() if p not in REMOTE] + openvino_devices()
    ordered = [p for p in PREFERENCE if p in offered]
    return ordered + [p for p in offered if p not in ordered and p not in REMOTE]


def choose_providers(device: str | None = None) -> list[str]:
    """Providers to try for ``device`` (``auto`` = best available), CPU always last."""
    device = (config.get("device", device) or "auto").lower()
    if device in {p.lower() for p in REMOTE} or device == "azure":
        raise ConfigError(f"device {device!r} runs remotely; medai only uses local execution providers")
    if device == "cpu":  # asked for the CPU provider: enumerate (and load) no accelerator runtime
        return [CPU]
    available = available_providers()
    if device == "auto":
        chosen = [p for p in available if p != CPU]
    else:
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r}; use auto or one of {', '.join(DEVICES)}")
        chosen = [p for p in DEVICES[device] if p in available]
        if not chosen and device != "cpu":
            hint = ("install medai[openvino] (scripts/setup --openvino)" if device.startswith("openvino")
                    else "install the matching extra")
            raise BackendError(f"device {device!r} requested but this machine offers only "
                               f"{', '.join(available)}; {hint} (see docs/models.md)")
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


def session_options(threads: int) -> "ort.SessionOptions":
    """Session options for ``threads`` intra-op threads (whether the arena is kept between runs
    is a run option, as the graph's card says: see :class:`_ShrinkingArena`)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = True  # always: fewer page faults (see the module docstring)
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    # Idle pool threads sleep instead of spinning: on a shared 2-8 core workstation the
    # spinning burns the cores the UI and the other processes need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


@dataclass
class Session:
    """One ONNX graph ready to run on one provider, in one precision."""

    key: str
    file_sha256: str
    provider: str
    threads: int
    input_name: str
    output_name: str
    _session: Any = field(repr=False)
    fallback_reason: str | None = None
    #: The precision the provider really computes in (read back after compiling).
    precision: str = "fp32"

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run the graph on one input array; returns its one output array."""
        return self._session.run([self.output_name], {self.input_name: x})[0]

    def run_feeds(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run a graph with several inputs (e.g. embedding + prompt box); ``outputs`` by name
        (default: the card's output only)."""
        return list(self._session.run(outputs or [self.output_name], feeds))

    def describe(self) -> dict[str, Any]:
        """Provider, precision and runtime version: what ``result.json`` records per graph."""
        return {"graph": self.key, "provider": self.provider, "precision": self.precision,
                "runtime": runtime_version(self.provider), "threads": self.threads,
                **({"fallback": self.fallback_reason} if self.fallback_reason else {})}


_cache: dict[tuple[str, str, int, str], Session] = {}
#: (card sha256, graph, device, threads, precision) → a session :func:`prepare_sessions` is making.
_prepared: dict[tuple[str, str, str | None, int | None, str | None], "concurrent.futures.Future[Session]"] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class _Port:
    """The part of onnxruntime's NodeArg that parity feeds need (name, shape, type)."""

    name: str
    shape: tuple[Any, ...]
    type: str


_ORT_TYPE_NAMES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
                   np.dtype(np.float64): "tensor(double)", np.dtype(np.int64): "tensor(int64)",
                   np.dtype(np.int32): "tensor(int32)", np.dtype(np.uint8): "tensor(uint8)",
                   np.dtype(np.bool_): "tensor(bool)"}


class _OpenVINOGraph:
    """A compiled OpenVINO model behind onnxruntime's ``run(output_names, feeds)`` call,
    so pipelines and parity checks use one interface for both runtimes."""

    def __init__(self, compiled: Any, provider: str, *, keep_memory: bool = False) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._provider = provider
        # Like onnxruntime's arena setting: a graph run once per volume gives its intermediate
        # buffers back after each run (OpenVINO keeps them for the request's lifetime otherwise,
        # e.g. the first stage's while the second runs); per-slice graphs keep them.
        self._release = not keep_memory and hasattr(compiled, "release_memory")
        self._lock = threading.Lock()  # one infer request: one run at a time

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            # share_outputs=False: the request's buffers are reused by the next run.
            results = self._request.infer(feeds, share_inputs=True, share_outputs=False)
            names = output_names or [o.get_any_name() for o in self._compiled.outputs]
            by_name = {port.get_any_name(): value for port, value in results.items()}
            if self._release:
                self._compiled.release_memory()
            return [by_name[n] for n in names]

    def get_inputs(self) -> list[_Port]:
        ports = []
        for port in self._compiled.inputs:
            shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            dtype = np.dtype(port.get_element_type().to_dtype())
            ports.append(_Port(port.get_any_name(), shape, _ORT_TYPE_NAMES.get(dtype, "tensor(float)")))
        return ports

    def get_providers(self) -> list[str]:
        return [self._provider]


def _ov_precision_name(value: Any) -> str:
    text = str(getattr(value, "get_type_name", lambda: value)()).lower()
    return {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16",
            "float16": "fp16"}.get(text, text)


def _ov_ops_in(compiled: Any, element_type: str) -> int:
    """How many operations of the compiled graph run in ``element_type`` (``bf16``, ``f16``);
    -1 when the plugin does not say."""
    try:
        ops = compiled.get_runtime_model().get_ordered_ops()
        return sum(1 for op in ops if "runtimePrecision" in op.get_rt_info()
                   and op.get_rt_info()["runtimePrecision"].astype(str) == element_type)
    except Exception:  # not every plugin exposes its runtime graph
        return -1


def _make_openvino(path: Path, spec: "GraphSpec | None", provider: str, threads: int,
                   precision: str) -> tuple[_OpenVINOGraph, str]:
    """Compile ``path`` for an OpenVINO device; returns the graph and the precision it really uses."""
    if precision not in _OV_HINT and precision != "int8":
        raise BackendError(f"{path.name}: OpenVINO cannot compile precision {precision!r}")
    core = _ov_core()
    device = OV_PROVIDERS[provider]
    try:
        model = core.read_model(str(path))
        if spec is not None and spec.input in {p.get_any_name() for p in model.inputs}:
            port = next(p for p in model.inputs if p.get_any_name() == spec.input)
            # A static input shape compiles to faster kernels and skips shape inference per run;
            # graphs a plan may tile keep their dynamic shape.
            if port.get_partial_shape().is_dynamic and len(spec.shape) == len(port.get_partial_shape()):
                model.reshape({spec.input: list(spec.shape)})
        # Compiled-graph cache, one folder per device and precision: OpenVINO 2026.4 given one
        # folder for the same model compiled in two precisions loads the wrong blob for the
        # second and crashes in its first run (seen with LiteMedSAM's encoder, fp32 then bf16).
        cache = home.cache_dir(f"openvino/{device.lower()}-{precision}")
        props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(cache)}
        if device == "CPU":
            # Threads as for onnxruntime; no pinning: on a shared workstation pinned threads
            # fight the UI and the other processes for the same cores.
            props.update({"INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False, "NUM_STREAMS": 1})
        if precision in _OV_HINT:
            props["INFERENCE_PRECISION_HINT"] = _OV_HINT[precision]
        compiled = core.compile_model(model, device, props)
    except Exception as exc:  # OpenVINO raises RuntimeError with the plugin's text
        raise BackendError(f"{path.name}: OpenVINO cannot compile it for {device} ({exc})") from exc
    try:
        used = _ov_precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:  # some plugins do not report it
        used = precision
    if used in ("bf16", "fp16") and _ov_ops_in(compiled, {"bf16": "bf16", "fp16": "f16"}[used]) == 0:
        used = "fp32"  # the hint was accepted but no operation runs in it: it is an fp32 run
    if precision == "int8":
        used = "int8"  # int8 comes from the graph's own quantised weights, not from a hint
    return _OpenVINOGraph(compiled, provider, keep_memory=bool(spec is not None and spec.memory_arena)), used


def _make(path: Path, digest: str, key: str, spec_input: str, spec_output: str, provider: str,
          threads: int, *, reference: bool = False, memory_arena: bool = False, precision: str = "fp32",
          spec: "GraphSpec | None" = None, strict: bool = True) -> Session:
    """A session of ``path`` on ``provider``. ``strict``: raise when the runtime substituted
    another provider or precision (onnxruntime falls back to CPU with only a warning);
    otherwise return the session of what really runs, for the parity check to report."""
    if provider in OV_PROVIDERS:
        graph, used_precision = _make_openvino(path, spec, provider, threads, precision)
        if strict and used_precision != precision:
            raise BackendError(f"{path.name}: asked {provider} for {precision}, it compiled {used_precision}")
        return Session(key, digest, provider, threads, spec_input, spec_output, graph, precision=used_precision)
    if precision not in ("fp32", "int8"):
        raise BackendError(f"{path.name}: onnxruntime runs this graph in fp32 only on {provider}")
    ort = _ort()
    opts = session_options(threads)
    if reference:  # the plainest execution of the graph: no fusions or layout rewrites
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        with warnings.catch_warnings():  # an unavailable provider is reported through the result
            warnings.simplefilter("ignore")
            raw = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BackendError(f"{path.name}: cannot create an ONNX Runtime session on {provider} ({exc})") from exc
    used = raw.get_providers()[0]
    if strict and used != provider:
        raise BackendError(f"{path.name}: {provider} could not start here (onnxruntime created {used} instead)")
    if not memory_arena:
        raw = _ShrinkingArena(raw)
    return Session(key, digest, used, threads, spec_input, spec_output, raw, precision=precision)


class _ShrinkingArena:
    """An onnxruntime session whose CPU arena is given back at the end of every run (a graph
    run once per volume); everything but ``run`` is the session's own."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._options = _ort().RunOptions()
        self._options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray],
            run_options: Any = None) -> list[np.ndarray]:
        return self._session.run(output_names, feeds, run_options or self._options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def parity_cache_path() -> Path:
    return home.cache_dir() / "parity.json"


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
                 use_cache: bool = True, precision: str = "fp32") -> ParityResult:
    """Compare graph ``key`` on ``provider`` in ``precision`` with CPU fp32 on the fixed input
    (cached per machine)."""
    spec = bundle.card.graphs[key]
    digest = bundle.card.files[spec.file]
    cache_key = f"{digest}|{provider}|{precision}|{runtime_version(provider)}"
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
                  memory_arena=spec.memory_arena, precision=precision, spec=spec, strict=False)
    feed = _parity_feed(cpu._session, spec)
    ref = cpu._session.run([spec.output], feed)[0]
    out = other._session.run([spec.output], feed)[0]
    diff = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64))))
    dice = _dice(ref > 0, out > 0)
    tol, dice_min = bundle.card.parity.get("max_abs_diff", 1e-3), bundle.card.parity.get("dice_min", 0.99)
    substituted = other.provider != provider or other.precision != precision
    if precision != "fp32" or provider in OV_PROVIDERS:
        # Logits in bf16/fp16/int8 legitimately differ by more than an fp32 tolerance, and so
        # do another runtime's fp32 kernels (OpenVINO on the main brain graph: up to 1.7 on
        # large logits of this synthetic input, masks Dice 0.9994); what must hold here is
        # the mask. This input is only a sanity check; the gate proper (Dice >= 0.995 on
        # real validation inputs) is the tuning, medai.inference.tune.
        tol = float("inf")
    passed = diff <= tol and dice >= dice_min and not substituted
    if other.provider != provider:
        reason = f"{provider} is not usable here (onnxruntime ran {other.provider} instead)"
    elif other.precision != precision:
        reason = f"{provider} cannot compute in {precision} here (it compiled {other.precision})"
    elif not passed:
        reason = (f"{provider} {precision} differs from CPU on the parity input: max |diff| {diff:.3g} "
                  f"(limit {tol:g}), Dice {dice:.4f} (min {dice_min:g})")
    else:
        reason = ""
    result = ParityResult(other.provider, passed, diff, dice, time.perf_counter() - t0, False, reason)
    if use_cache:
        cache[cache_key] = {k: v for k, v in result.__dict__.items() if k != "cached"}
        tmp = cache_file.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")  # threads prepare sessions
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, cache_file)
    return result


def _candidates(bundle: "Bundle", key: str, providers: list[str], precision: str | None,
                threads: int, auto: bool = False) -> list[tuple[str, str]]:
    """(provider, precision) pairs to try in order: the machine's tuned verdict first when no
    precision was asked for, then each provider in fp32. With ``auto``, OpenVINO on the CPU
    is used only where tuning measured it faster: both run on the same cores, and an
    untuned first run would pay OpenVINO's compile and parity check for an unknown gain."""
    if precision is not None:
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        return [(p, precision) for p in providers if p != CPU] + [(CPU, "fp32")]
    pairs: list[tuple[str, str]] = []
    from medai.inference import tune

    best = tune.preferred(bundle, key, providers, threads)
    if best is not None:
        pairs.append(best)
    pairs += [(p, "fp32") for p in providers if (p, "fp32") not in pairs and not (auto and p == OV_CPU)]
    return pairs


def _tuned(bundle: "Bundle", key: str, provider: str, precision: str) -> bool:
    """True when this machine's tuning measured ``provider``/``precision`` on real inputs and
    chose it (that check is stricter than the fixed-input parity check, which it replaces)."""
    from medai.inference import tune

    verdict = tune.lookup(bundle.card.files[bundle.card.graphs[key].file])
    chosen = verdict.chosen if verdict else None
    return bool(chosen and chosen.provider == provider and chosen.precision == precision
                and chosen.runtime == runtime_version(provider))


def prepare_sessions(bundle: "Bundle", *, device: str | None = None, threads: int | None = None,
                     precision: str | None = None) -> None:
    """Start making the sessions of every graph of ``bundle`` in a background thread.

    A run calls this before it reads its series: compiling a graph (OpenVINO, about 0.2 s
    a graph even from its compiled-graph cache) and creating an ONNX Runtime session run
    in native code without the interpreter lock, so they overlap the DICOM read and the
    preprocessing, which are Python and numpy. :func:`get_session` with the same
    arguments then waits for the prepared session instead of making a second one, and
    raises what making it raised. Nothing here touches patient data."""
    requests = []
    with _lock:
        for key in bundle.card.graphs:
            request = (bundle.card_sha256, key, device, threads, precision)
            if request not in _prepared:
                _prepared[request] = concurrent.futures.Future()
                requests.append((key, _prepared[request]))
    if not requests:
        return

    def work() -> None:
        for key, future in requests:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(_get_session(bundle, key, device=device, threads=threads, precision=precision))
            except BaseException as exc:  # handed to the run that asks for this session
                future.set_exception(exc)

    threading.Thread(target=work, name=f"medai-sessions-{bundle.id}", daemon=True).start()


def get_session(bundle: "Bundle", key: str, *, device: str | None = None, threads: int | None = None,
                precision: str | None = None) -> Session:
    """A cached, parity-checked session for graph ``key`` of ``bundle`` (see :func:`_get_session`);
    one that :func:`prepare_sessions` is making is waited for."""
    with _lock:
        future = _prepared.pop((bundle.card_sha256, key, device, threads, precision), None)
    if future is not None:
        return future.result()
    return _get_session(bundle, key, device=device, threads=threads, precision=precision)


def _get_session(bundle: "Bundle", key: str, *, device: str | None = None, threads: int | None = None,
                 precision: str | None = None) -> Session:
    """A cached, parity-checked session for graph ``key`` of ``bundle``.

    Tries the chosen providers in order (``precision`` None: this machine's tuned
    provider and precision first, see :mod:`medai.inference.tune`, then fp32); a
    provider that cannot start, substitutes another provider or precision, or fails
    its parity check is skipped with the reason kept on the returned session.
    """
    if key not in bundle.card.graphs:
        raise BackendError(f"model {bundle.id}: card has no graph {key!r} (has {', '.join(bundle.card.graphs)})")
    spec = bundle.card.graphs[key]
    digest = bundle.card.files[spec.file]
    n = thread_count(threads)
    precision = config.get("precision", precision) if precision is None else precision
    precision = None if precision in (None, "", "auto") else str(precision).lower()
    reasons: list[str] = []
    auto = (config.get("device", device) or "auto").lower() == "auto"
    for provider, prec in _candidates(bundle, key, choose_providers(device), precision, n, auto):
        cache_key = (digest, provider, n, prec)
        with _lock:
            if cache_key in _cache:
                cached = _cache[cache_key]
                if reasons and cached.fallback_reason is None:
                    cached.fallback_reason = "; ".join(reasons)
                return cached
        if provider != CPU and not _tuned(bundle, key, provider, prec):
            try:
                parity = parity_check(bundle, key, provider, threads=n, precision=prec)
            except BackendError as exc:
                reasons.append(str(exc))
                continue
            if not parity.passed:
                reasons.append(parity.reason)
                log.warning("%s: %s; falling back", bundle.id, parity.reason)
                continue
        try:
            session = _make(bundle.file(spec.file), digest, key, spec.input, spec.output, provider, n,
                            memory_arena=spec.memory_arena, precision=prec, spec=spec)
        except BackendError as exc:
            reasons.append(str(exc))
            log.warning("%s: %s; falling back", bundle.id, exc)
            continue
        session.fallback_reason = "; ".join(reasons) or None
        with _lock:
            _cache[cache_key] = session
        return session
    raise BackendError(f"model {bundle.id}: no execution provider could run {spec.file}: {'; '.join(reasons)}")


def clear_sessions() -> None:
    with _lock:
        _cache.clear()
        _prepared.clear()


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
        "openvino": _ov_version() if openvino_installed() else None,
        "openvino_devices": openvino_devices(),
    }
    if len(dists) > 1:
        info["warning"] = (f"several onnxruntime distributions installed ({', '.join(dists)}); they share one "
                           "module and overwrite each other: keep exactly one (see docs/models.md)")
    return info
