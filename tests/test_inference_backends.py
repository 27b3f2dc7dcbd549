"""Backend policy, parity check, planner and the deterministic steps (fast, real ONNX graphs)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from medai.errors import BackendError, ConfigError, ResourceError
from medai.inference import backends, planner, registry
from medai.inference.pipeline import Prompt
from medai.inference.steps import bbox_with_margin, normalize, reorientation, resize_nearest


def test_remote_providers_are_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "AzureExecutionProvider" not in backends.available_providers()
    assert backends.choose_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(ConfigError, match="remotely"):
        backends.choose_providers("AzureExecutionProvider")
    with pytest.raises(ConfigError, match="unknown device"):
        backends.choose_providers("tpu")
    monkeypatch.setenv("MEDAI_DEVICE", "cpu")
    assert backends.choose_providers() == ["CPUExecutionProvider"]


def test_missing_accelerator_is_a_clear_error() -> None:
    if "CUDAExecutionProvider" in backends.available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendError, match="install the matching extra"):
        backends.choose_providers("cuda")


def test_parity_check_runs_and_is_cached() -> None:
    bundle = registry.get_bundle("brain-extraction")
    first = backends.parity_check(bundle, "bbox", "CPUExecutionProvider")
    assert first.passed and not first.cached and first.dice > 0.99
    again = backends.parity_check(bundle, "bbox", "CPUExecutionProvider")
    assert again.cached and again.max_abs_diff == first.max_abs_diff
    session = backends.get_session(bundle, "bbox", device="cpu", threads=1)
    assert session is backends.get_session(bundle, "bbox", device="cpu", threads=1)  # cached
    assert session.provider == "CPUExecutionProvider"


def test_planner_predicts_and_refuses_impossible_budgets() -> None:
    bundle = registry.get_bundle("brain-extraction")
    plan = planner.plan(bundle, (181, 217, 181))
    assert 300 * planner.MB < plan.predicted_bytes < 4000 * planner.MB
    assert planner.plan(bundle, (181, 217, 181), 8 * 1024 * planner.MB).tile is None
    with pytest.raises(ResourceError, match="needs about"):
        planner.plan(bundle, (181, 217, 181), 100 * planner.MB)
    assert planner.peak_rss_bytes() > 10 * planner.MB


def test_resize_follows_nearest_exact() -> None:
    x = np.arange(5)[None, None, :]
    # torch nearest-exact: src = floor((dst + 0.5) * 5 / 3) -> 0, 2, 4 ; upsampling 5 -> 8
    assert resize_nearest(x, (1, 1, 3)).ravel().tolist() == [0, 2, 4]
    assert resize_nearest(x, (1, 1, 8)).ravel().tolist() == [0, 0, 1, 2, 2, 3, 4, 4]


def test_reorientation_round_trip_and_canonical_axes() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((4, 5, 6))
    # axial LPS volume: i -> L, j -> P, k -> S; RAS canonical flips i and j only
    r = reorientation((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert r.perm == (0, 1, 2) and r.flip == (True, True, False)
    assert np.array_equal(r.invert(r.apply(a)), a)
    # sagittal: i -> P... any orthonormal direction round-trips
    r = reorientation((0, 0, -1, 1, 0, 0, 0, -1, 0))
    assert np.array_equal(r.invert(r.apply(a)), a)
    assert r.apply(a).shape == tuple(a.shape[::-1][p] for p in r.perm)


def test_normalize_matches_the_reference_formula() -> None:
    x = np.random.default_rng(1).normal(100, 30, (20, 30, 40)).astype(np.float32)
    y = normalize(x, 50.0, 150.0, 0.226, 0.449)
    z = np.clip((x.astype(np.float64) - 50) / 100, 0, 1)
    ref = (z - z.mean()) / z.std(ddof=1) * 0.226 + 0.449
    assert np.abs(y - ref).max() < 1e-5


def test_resize_normalize_is_resize_then_normalize() -> None:
    """The fused step (statistics weighted on the source voxels) gives the two card steps'
    values to float32 rounding, up- and downsampling, with clipped tails."""
    from medai.inference.steps import resize_normalize

    rng = np.random.default_rng(5)
    for src, dst in (((37, 45, 29), (64, 64, 64)), ((50, 23, 41), (20, 64, 33)), ((16, 16, 16), (16, 16, 16))):
        x = rng.gamma(2.0, 40.0, src).astype(np.float32)
        expected = normalize(resize_nearest(x, dst), 20.0, 200.0, 0.226, 0.449)
        got = resize_normalize(x, dst, 20.0, 200.0, 0.226, 0.449)
        assert got.shape == dst and got.dtype == np.float32
        assert np.abs(got - expected).max() < 2e-6 * max(1.0, float(np.abs(expected).max()))


def test_bbox_with_margin() -> None:
    m = np.zeros((10, 10, 10), bool)
    m[2:6, 3:7, 4:8] = True
    box = bbox_with_margin(m, (20, 20, 20), margin=0.1)
    assert [(s.start, s.stop) for s in box] == [(3, 13), (5, 15), (7, 17)]


def test_prompt_parsing() -> None:
    p = Prompt.from_dict({"plane": "coronal", "slice": 12, "box": "10,20,30,40", "propagate": True})
    assert p.box == (10, 20, 30, 40) and p.slice_index == 12 and p.plane == "coronal"
    with pytest.raises(ValueError):
        Prompt.from_dict({"box": "30,20,10,40"})
    with pytest.raises(ValueError):
        Prompt.from_dict({"plane": "oblique"})


def test_runtime_does_not_import_torch() -> None:
    code = ("import sys, medai.inference.run, medai.inference.pipelines.brain_extraction, medai.cli.run, "
            "medai.cli.models, medai.cli.doctor, medai.dicom.outputs.seg; "
            "bad = [m for m in ('torch', 'monai', 'deepbet') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sliding_window_blends_to_the_exact_answer_for_pointwise_models() -> None:
    from medai.inference.sliding import sliding_window

    x = np.random.default_rng(2).random((37, 50, 23)).astype(np.float32)
    for blend in ("gaussian", "constant"):
        y = sliding_window(x, (16, 16, 16), lambda t: 2 * t + 1, overlap=0.5, blend=blend)  # type: ignore[arg-type]
        assert y.shape == (1, 37, 50, 23)
        assert np.allclose(y[0], 2 * x + 1, atol=1e-5)


def test_sliding_window_runs_a_real_graph_on_tiles() -> None:
    from medai.inference.sliding import sliding_window
    from medai.inference.steps import space_to_depth

    bundle = registry.get_bundle("brain-extraction")
    session = backends.get_session(bundle, "bbox", device="cpu")

    def run(tile: np.ndarray) -> np.ndarray:  # the graph reads its image in space-to-depth layout
        return session.run(space_to_depth(np.ascontiguousarray(tile[0, 0]), 2, 3)[None])

    x = np.random.default_rng(11).random((96, 96, 64), dtype=np.float32)
    whole = run(x[None, None])[0]
    # one tile covering everything reproduces the whole-volume run exactly
    assert np.allclose(sliding_window(x, x.shape, run), whole, rtol=1e-5, atol=1e-5)
    # smaller tiles run and blend; this network normalises per instance (whole-volume
    # statistics), so tiles change its answer: the card therefore declares no tile size
    y = sliding_window(x, (64, 64, 64), run, overlap=0.25)
    assert y.shape == whole.shape and not np.array_equal(y > 0, whole > 0)


def test_provider_failing_parity_falls_back_to_cpu_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider that cannot really run here (CUDA on a CPU-only build: onnxruntime quietly
    runs CPU instead) fails its parity check; the run falls back to CPU and says why."""
    if "CUDAExecutionProvider" in backends._ort().get_available_providers():
        pytest.skip("this machine really has CUDA")
    monkeypatch.setattr(backends, "available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    backends.clear_sessions()
    bundle = registry.get_bundle("brain-extraction")
    session = backends.get_session(bundle, "bbox", device="auto", threads=1)
    assert session.provider == "CPUExecutionProvider"
    assert session.fallback_reason and "CUDAExecutionProvider is not usable here" in session.fallback_reason
    cached = backends.parity_check(bundle, "bbox", "CUDAExecutionProvider")
    assert cached.cached and not cached.passed
    backends.clear_sessions()


def test_prepared_sessions_are_made_once_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run starts its sessions before it reads the series (backends.prepare_sessions): each
    graph's session is made once, off the main thread, and get_session hands that one back."""
    import threading

    made: list[tuple[str, str]] = []
    real_make = backends._make

    def counting_make(*args, **kwargs):  # type: ignore[no-untyped-def]
        made.append((args[2], threading.current_thread().name))
        return real_make(*args, **kwargs)

    monkeypatch.setattr(backends, "_make", counting_make)
    backends.clear_sessions()
    bundle = registry.get_bundle("brain-extraction")
    backends.prepare_sessions(bundle, device="cpu", threads=1)
    backends.prepare_sessions(bundle, device="cpu", threads=1)  # a second call adds nothing
    main = backends.get_session(bundle, "main", device="cpu", threads=1)
    bbox = backends.get_session(bundle, "bbox", device="cpu", threads=1)
    assert sorted(key for key, _ in made) == ["bbox", "main"]
    assert all(name.startswith("medai-sessions-") for _, name in made)
    assert bbox is backends.get_session(bundle, "bbox", device="cpu", threads=1)
    assert main.provider == bbox.provider == "CPUExecutionProvider"
    # Other arguments are another request: made by the caller, not taken from the prepared ones.
    assert backends.get_session(bundle, "bbox", device="cpu", threads=2) is not bbox
    assert len(made) == 3 and made[-1][1] == threading.current_thread().name
    backends.clear_sessions()


def test_a_prepared_session_that_failed_raises_in_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """What making a session raised in the background is raised where the run asks for it,
    as if the run had made it; the next request tries again."""
    real_make = backends._make
    broken = {"on": True}

    def failing_make(*args, **kwargs):  # type: ignore[no-untyped-def]
        if broken["on"] and args[2] == "main":
            raise BackendError("main.onnx: cannot create an ONNX Runtime session (test)")
        return real_make(*args, **kwargs)

    monkeypatch.setattr(backends, "_make", failing_make)
    backends.clear_sessions()
    bundle = registry.get_bundle("brain-extraction")
    backends.prepare_sessions(bundle, device="cpu", threads=1)
    assert backends.get_session(bundle, "bbox", device="cpu", threads=1).provider == "CPUExecutionProvider"
    with pytest.raises(BackendError, match=r"no execution provider could run main\.onnx.*\(test\)"):
        backends.get_session(bundle, "main", device="cpu", threads=1)
    broken["on"] = False
    assert backends.get_session(bundle, "main", device="cpu", threads=1).provider == "CPUExecutionProvider"
    backends.clear_sessions()


def test_labelling_is_scipys_voxel_for_voxel() -> None:
    """steps.label (numpy, run-based) gives scipy.ndimage.label's labels, numbering and counts
    with the face and the full structuring element, from 1-D to 4-D, sparse to dense masks,
    and on a real head mask and its background (what brain extraction labels)."""
    from scipy import ndimage

    from medai.data import demo_t1_dir
    from medai.dicom.volume import load_series
    from medai.inference.steps import fill_holes, label, largest_component

    rng = np.random.default_rng(11)
    head = load_series(demo_t1_dir()).array
    cases = [rng.random(shape) < p for shape in [(1,), (9,), (1, 1), (7, 9), (30, 41), (12, 13, 14), (40, 31, 2),
                                                   (1, 20, 20), (3, 4, 5, 6)] for p in (0.05, 0.3, 0.5, 0.7, 0.95)]
    cases += [np.zeros((4, 5, 6), bool), np.ones((4, 5, 6), bool), head > np.percentile(head, 40),
              head > np.percentile(head, 75)]
    for mask in cases:
        for full in (True, False):
            structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if full else 1)
            expected, n = ndimage.label(mask, structure=structure)
            labels, counts = label(mask, full)
            assert labels.dtype == np.int32 and np.array_equal(labels, expected), (mask.shape, full)
            assert counts.tolist() == [0] + np.bincount(expected.ravel(), minlength=n + 1)[1:].tolist()
    mask = head > np.percentile(head, 40)
    assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert np.array_equal(largest_component(mask), labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def test_onnxruntime_providers_come_from_the_cache_without_importing_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A run on OpenVINO need not load onnxruntime only to list its providers: the list is kept
    per installed build, read back without the import, and made again when the build differs."""
    import json
    import os

    code = ("import json, sys\nfrom medai.inference import backends\n"
            "print(json.dumps([backends.available_providers(), 'onnxruntime' in sys.modules, backends.ort_version()]))")
    env = {**os.environ, "MEDAI_HOME": str(tmp_path / "home")}

    def child() -> list:  # type: ignore[type-arg]
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first, second = child(), child()
    ort = backends._ort()
    expected = [p for p in backends.available_providers()]
    assert first == [expected, True, ort.__version__]
    assert second == [expected, False, ort.__version__]
    cache = tmp_path / "home" / "cache" / "onnxruntime-providers.json"
    data = json.loads(cache.read_text())
    cache.write_text(json.dumps({"build": data["build"] + "-other", "providers": ["CUDAExecutionProvider"]}))
    assert child() == [expected, True, ort.__version__]  # another build: listed again, by onnxruntime


def test_nan_to_num_step_matches_numpy_and_skips_clean_arrays() -> None:
    from medai.inference.steps import nan_to_num

    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        dirty = rng.normal(size=(6, 7, 8)).astype(dtype)
        dirty[1, 2, 3], dirty[2, 3, 4], dirty[3, 4, 5] = np.nan, np.inf, -np.inf
        expected = np.nan_to_num(dirty.copy())
        out = nan_to_num(dirty)
        assert out is dirty and np.array_equal(out, expected)
        clean = rng.normal(size=(6, 7, 8)).astype(dtype)
        before = clean.copy()
        assert nan_to_num(clean) is clean and np.array_equal(clean, before)
    huge = np.full((4, 4), np.finfo(np.float64).max)  # finite, but its sum overflows: the full pass
    huge[0, 0] = np.nan
    assert np.array_equal(nan_to_num(huge), np.nan_to_num(huge.copy()))
    ints = np.arange(10, dtype=np.uint16)
    assert nan_to_num(ints) is ints


@pytest.mark.parametrize("shape,factor,pad", [((256, 256, 256), 2, 3), ((128, 128, 128), 2, 3), ((6, 9, 12), 3, 0),
                                              ((4, 5, 6), 1, 2), ((6, 8, 10), 2, 1)])
def test_space_to_depth_is_pad_then_interleave(shape, factor, pad) -> None:  # type: ignore[no-untyped-def]
    from medai.inference.steps import space_to_depth

    x = np.random.default_rng(3).random(shape, dtype=np.float32)
    got = space_to_depth(x, factor, pad)
    padded = np.pad(x, pad)
    h = [n // factor for n in padded.shape]
    expected = padded.reshape(h[0], factor, h[1], factor, h[2], factor).transpose(1, 3, 5, 0, 2, 4)
    assert got.shape == (factor ** 3, *h) and got.dtype == x.dtype
    assert np.array_equal(got, expected.reshape(factor ** 3, *h))


def test_space_to_depth_refuses_what_does_not_divide() -> None:
    from medai.inference.steps import space_to_depth

    with pytest.raises(ValueError, match="multiple"):
        space_to_depth(np.zeros((5, 6, 6), np.float32), 2, 1)
    with pytest.raises(ValueError, match="3-D"):
        space_to_depth(np.zeros((4, 4), np.float32), 2, 0)


def test_shipped_graphs_read_the_space_to_depth_input_the_card_declares() -> None:
    """The card's graph shapes are the space_to_depth of its resize shapes, and a graph run on a
    real normalised volume gives the mask the card's steps lead to (same as the pipeline)."""
    from medai.inference import registry
    from medai.inference.steps import space_to_depth

    bundle = registry.get_bundle("brain-extraction")
    card = bundle.card
    for stage in ("bbox", "main"):
        resize = next(s.params for s in card.preprocessing if s.op == "resize" and s.params.get("stage") == stage)
        s2d = next(s.params for s in card.preprocessing if s.op == "space_to_depth" and s.params.get("stage") == stage)
        f, pad = int(s2d["factor"]), int(s2d["pad"])
        want = (1, f ** 3, *((n + 2 * pad) // f for n in resize["shape"]))
        assert tuple(card.graphs[stage].shape) == want
        assert space_to_depth(np.zeros(resize["shape"], np.float32), f, pad)[None].shape == want


@pytest.mark.parametrize("crop,shape,factor,pad", [((150, 181, 163), (256, 256, 256), 2, 3),
                                                   ((60, 70, 50), (128, 128, 128), 2, 3),
                                                   ((9, 5, 7), (12, 6, 8), 2, 2), ((9, 5, 7), (4, 4, 4), 2, 0)])
def test_resize_into_space_to_depth_is_resize_then_space_to_depth(crop, shape, factor, pad) -> None:  # type: ignore[no-untyped-def]
    from medai.inference.steps import resize_nearest, resize_nearest_s2d, resize_normalize, space_to_depth

    x = np.random.default_rng(5).random(crop, dtype=np.float32) * 500
    assert np.array_equal(resize_nearest_s2d(x, shape, factor, pad), space_to_depth(resize_nearest(x, shape), factor, pad))
    fused = resize_normalize(x, shape, 10.0, 400.0, 0.226, 0.449, space_to_depth=(factor, pad))
    assert np.array_equal(fused, space_to_depth(resize_normalize(x, shape, 10.0, 400.0, 0.226, 0.449), factor, pad))


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                                       (0, 1, 0, 0, 0, -1, 1, 0, 0)])
def test_reorientation_converts_in_the_same_pass(direction) -> None:  # type: ignore[no-untyped-def]
    from medai.inference.steps import reorientation

    orient = reorientation(direction, "RAS")
    for array in (np.random.default_rng(2).random((5, 6, 7)), (np.random.default_rng(2).random((5, 6, 7)) * 4000 - 1000).astype(np.int16)):
        one_pass = orient.apply(array, dtype=np.float32)
        assert one_pass.dtype == np.float32 and one_pass.flags.c_contiguous
        assert np.array_equal(one_pass, orient.apply(array.astype(np.float32)))
        assert np.array_equal(orient.invert(one_pass), array.astype(np.float32))
