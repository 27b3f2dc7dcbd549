// medai viewport: a Streamlit custom component (components.v1 protocol) built on NiiVue.
//
// Why it exists: every interaction with an image (slice step, window/level, zoom, pan,
// crosshair, cine, measuring) must run at display rate, so it happens here in the browser
// on a volume sent once per series. The server only learns about what the clinician
// asked for explicitly (a picked point, a measurement, a prompt box), as RAS voxel
// indices of the volume it sent; medai.viewer maps those back to the series (tested).
//
// The volume arrives as a NIfTI whose voxel grid is already RAS-aligned (i to patient
// Right, j to Anterior, k to Superior, diagonal affine), so NiiVue's voxel, the array
// index below and the voxel the server maps are the same three numbers.

import { Niivue, SLICE_TYPE, MULTIPLANAR_TYPE, SHOW_RENDER, DRAG_MODE } from "@niivue/niivue";

import { post, setValue, markFirstImage, S } from "./shell.js";

// ------------------------------------------------------------------ page state
const PLANES = ["axial", "coronal", "sagittal"]; // SLICE_TYPE.AXIAL=0, CORONAL=1, SAGITTAL=2
const NORMAL_AXIS = [2, 1, 0]; // RAS voxel axis along each plane's normal
const TOOLS = [
  ["navigate", "W/L · click", "Left-drag: window/level; click: move all planes"],
  ["probe", "Probe", "Click: read the value at a point"],
  ["distance", "Distance", "Drag: measure a distance (several allowed)"],
  ["ellipse", "Ellipse ROI", "Drag: ellipse ROI with mean, SD, min, max, area"],
  ["rectangle", "Rect ROI", "Drag: rectangle ROI with mean, SD, min, max, area"],
  ["box", "Box prompt (axial)", "Drag on the axial plane (left): box prompt for LiteMedSAM, which segments axial slices only"],
];

Object.assign(S, {
  volumeKey: null,
  labelKey: null,
  tool: "navigate",
  annotations: [],
  activeTile: 0,
  cineTimer: null,
  fps: 10,
  invert: false,
  hidden: new Set(),
  labelOpacity: 0.45,
  defaultWindow: null,
  steps: [], // in-page timing of slice steps (ms), read by tests and bench
  firstImageMs: null, // series arrived in the page -> the volume drawn by NiiVue
  drag: null,
});
const stage = document.getElementById("stage");
const glCanvas = document.getElementById("gl");
const ink = document.getElementById("ink");
const ctx = ink.getContext("2d");
const readout = document.getElementById("readout");

const nv = new Niivue({
  isRadiologicalConvention: true, // patient right on the screen's left
  sagittalNoseLeft: true, // anterior on the left in sagittal views
  multiplanarLayout: MULTIPLANAR_TYPE.ROW, // 1x3 MPR
  multiplanarShowRender: SHOW_RENDER.NEVER,
  show3Dcrosshair: false,
  crosshairColor: [0.1, 0.9, 0.3, 0.8],
  crosshairWidth: 1,
  backColor: [0, 0, 0, 1],
  isColorbar: false,
  isRuler: false,
  isNearestInterpolation: true, // every screen pixel shows a source voxel value
  dragAndDropEnabled: false,
  logLevel: "error",
  loadingText: "",
  isOrientationTextVisible: true,
  tileMargin: 4,
});

function vol() {
  return nv.volumes.length ? nv.volumes[0] : null;
}
function dims() {
  const h = vol().hdr;
  return [h.dims[1], h.dims[2], h.dims[3]];
}
function pixdim() {
  const h = vol().hdr;
  return [h.pixDims[1], h.pixDims[2], h.pixDims[3]];
}
function voxelValue(v) {
  const [nx, ny] = dims();
  return vol().img[v[0] + v[1] * nx + v[2] * nx * ny];
}
function crosshairVox() {
  return Array.from(nv.frac2vox(nv.scene.crosshairPos)).map((x) => Math.round(x));
}
function fmt(v, digits = 1) {
  return Number.isFinite(v) ? v.toFixed(digits) : "–";
}

// ------------------------------------------------------------------ window / level
function currentWL() {
  const v = vol();
  return { width: v.cal_max - v.cal_min, level: (v.cal_max + v.cal_min) / 2 };
}
function setWL(width, level) {
  const v = vol();
  v.cal_min = level - width / 2;
  v.cal_max = level + width / 2;
  nv.updateGLVolume();
  refreshCorners();
}
function setInvert(on) {
  S.invert = on;
  vol().colormapInvert = on;
  nv.updateGLVolume();
  refreshCorners();
}

// ------------------------------------------------------------------ slice stepping
function tileAt(clientX, clientY) {
  const r = glCanvas.getBoundingClientRect();
  const dpr = nv.uiData.dpr || 1;
  const t = nv.tileIndex((clientX - r.left) * dpr, (clientY - r.top) * dpr);
  return t >= 0 ? t : S.activeTile;
}
function planeOfTile(t) {
  const s = nv.screenSlices[t];
  return s ? s.axCorSag : SLICE_TYPE.AXIAL;
}
// One slice along the normal of `plane`, timed from the input event to the finished
// frame (NiiVue's drawScene ends with gl.finish()).
function step(plane, delta, t0) {
  const move = [0, 0, 0];
  move[NORMAL_AXIS[plane]] = delta;
  nv.moveCrosshairInVox(move[0], move[1], move[2]);
  drawInk();
  const ms = performance.now() - t0;
  S.steps.push({ plane, slice: crosshairVox()[NORMAL_AXIS[plane]], ms });
  if (S.steps.length > 2000) S.steps.splice(0, 1000);
}

stage.addEventListener(
  "wheel",
  (e) => {
    if (!vol()) return;
    e.preventDefault();
    e.stopPropagation();
    const t0 = performance.now();
    S.activeTile = tileAt(e.clientX, e.clientY);
    step(planeOfTile(S.activeTile), e.deltaY > 0 ? -1 : 1, t0);
  },
  { capture: true, passive: false },
);

// ------------------------------------------------------------------ mouse: zoom, tools, click
stage.addEventListener("contextmenu", (e) => e.preventDefault(), { capture: true });
// NiiVue resets the window to its own percentile range on a double click; ours is space
stage.addEventListener("dblclick", (e) => e.stopPropagation(), { capture: true });

function canvasPoint(e) {
  const r = glCanvas.getBoundingClientRect();
  const dpr = nv.uiData.dpr || 1;
  return [(e.clientX - r.left) * dpr, (e.clientY - r.top) * dpr];
}
function voxAt(e) {
  const frac = nv.canvasPos2frac(canvasPoint(e));
  if (!frac || frac[0] < 0) return null;
  return Array.from(nv.frac2vox(frac)).map((x) => Math.round(x));
}

stage.addEventListener(
  "mousedown",
  (e) => {
    if (!vol()) return;
    S.activeTile = tileAt(e.clientX, e.clientY);
    if (e.button === 2) {
      // right-drag: zoom (ours; NiiVue's right button is switched off)
      e.stopPropagation();
      S.drag = { kind: "zoom", y: e.clientY, zoom: nv.scene.pan2Dxyzmm[3] };
      return;
    }
    if (e.button !== 0) return; // middle: NiiVue's pan
    const v = voxAt(e);
    S.drag = { kind: "left", x: e.clientX, y: e.clientY, start: v, tile: S.activeTile, moved: false };
    if (S.tool !== "navigate") e.stopPropagation();
  },
  { capture: true },
);

window.addEventListener(
  "mousemove",
  (e) => {
    const d = S.drag;
    if (!d) return;
    if (d.kind === "zoom") {
      const zoom = Math.min(16, Math.max(0.25, d.zoom * Math.exp((d.y - e.clientY) / 200)));
      const p = nv.scene.pan2Dxyzmm;
      nv.setPan2Dxyzmm([p[0], p[1], p[2], zoom]);
      drawInk();
      refreshCorners();
      return;
    }
    if (Math.hypot(e.clientX - d.x, e.clientY - d.y) > 3) d.moved = true;
    if (S.tool !== "navigate" && d.start) {
      d.end = voxAt(e) || d.end;
      drawInk();
    } else if (d.moved) {
      refreshCorners(); // W/L is changing under NiiVue's windowing drag
    }
  },
  { capture: true },
);

window.addEventListener(
  "mouseup",
  (e) => {
    const d = S.drag;
    S.drag = null;
    if (!d || d.kind !== "left") return;
    if (S.tool === "navigate") {
      if (!d.moved) {
        // a click moves all three planes to the point
        const r = glCanvas.getBoundingClientRect();
        nv.mouseClick(e.clientX - r.left, e.clientY - r.top);
        nv.drawScene();
        pickAt(crosshairVox(), false);
      }
      refreshCorners();
      return;
    }
    e.stopPropagation();
    const end = voxAt(e) || d.end;
    if (!d.start || !end) return;
    const plane = planeOfTile(d.tile);
    finishTool(plane, d.start, end, d.moved);
    drawInk();
  },
  { capture: true },
);

// ------------------------------------------------------------------ annotations (tied to their slice)
function onSlice(a) {
  return crosshairVox()[NORMAL_AXIS[a.plane]] === a.slice;
}
function inPlaneAxes(plane) {
  return [0, 1, 2].filter((ax) => ax !== NORMAL_AXIS[plane]);
}
function roiStats(plane, a, b, ellipse) {
  const [u, w] = inPlaneAxes(plane);
  const pd = pixdim();
  const u0 = Math.min(a[u], b[u]), u1 = Math.max(a[u], b[u]);
  const w0 = Math.min(a[w], b[w]), w1 = Math.max(a[w], b[w]);
  const cu = (u0 + u1) / 2, cw = (w0 + w1) / 2, ru = (u1 - u0 + 1) / 2, rw = (w1 - w0 + 1) / 2;
  let n = 0, sum = 0, sum2 = 0, min = Infinity, max = -Infinity;
  const v = [0, 0, 0];
  v[NORMAL_AXIS[plane]] = a[NORMAL_AXIS[plane]];
  for (let i = u0; i <= u1; i++) {
    for (let j = w0; j <= w1; j++) {
      if (ellipse && ((i - cu) / ru) ** 2 + ((j - cw) / rw) ** 2 > 1) continue;
      v[u] = i;
      v[w] = j;
      const x = voxelValue(v);
      n += 1;
      sum += x;
      sum2 += x * x;
      if (x < min) min = x;
      if (x > max) max = x;
    }
  }
  const mean = sum / n;
  const sd = n > 1 ? Math.sqrt(Math.max(0, (sum2 - n * mean * mean) / (n - 1))) : 0;
  return { n, mean, sd, min, max, areaMm2: n * pd[u] * pd[w] };
}
function distanceMm(a, b) {
  const pd = pixdim();
  return Math.hypot((a[0] - b[0]) * pd[0], (a[1] - b[1]) * pd[1], (a[2] - b[2]) * pd[2]);
}
function finishTool(plane, start, end, moved) {
  const slice = start[NORMAL_AXIS[plane]];
  end = end.slice();
  end[NORMAL_AXIS[plane]] = slice; // a drag stays on the slice it started on
  if (S.tool === "probe") {
    S.annotations.push({ kind: "probe", plane, slice, a: start, value: voxelValue(start) });
    pickAt(start, true);
  } else if (S.tool === "distance" && moved) {
    S.annotations.push({ kind: "distance", plane, slice, a: start, b: end, mm: distanceMm(start, end) });
    setValue({ event: "distance", plane: PLANES[plane], a: start, b: end, mm: distanceMm(start, end) });
  } else if ((S.tool === "ellipse" || S.tool === "rectangle") && moved) {
    const stats = roiStats(plane, start, end, S.tool === "ellipse");
    S.annotations.push({ kind: S.tool, plane, slice, a: start, b: end, stats });
  } else if (S.tool === "box" && moved) {
    if (plane !== SLICE_TYPE.AXIAL) {
      readout.textContent = "Draw the prompt box on the axial plane (left).";
      return;
    }
    S.annotations = S.annotations.filter((x) => x.kind !== "box");
    S.annotations.push({ kind: "box", plane, slice, a: start, b: end });
    setValue({ event: "box", plane: "axial", a: start, b: end });
    readout.textContent = "Box prompt set: open Run model to segment it with LiteMedSAM.";
  }
}
function pickAt(v, report) {
  const value = voxelValue(v);
  readout.textContent = `${S.args.unit} ${fmt(value, 0)} at voxel (${v.join(", ")})`;
  if (report) setValue({ event: "pick", vox: v, value });
}

function canvasOf(v, plane) {
  const frac = nv.vox2frac(v);
  const hit = nv.frac2canvasPosWithTile(frac, plane);
  return hit ? hit.pos : null;
}
function label(text, x, y) {
  ctx.font = `${12 * (nv.uiData.dpr || 1)}px sans-serif`;
  ctx.lineWidth = 3;
  ctx.strokeStyle = "black";
  ctx.strokeText(text, x, y);
  ctx.fillStyle = "#ffd400";
  ctx.fillText(text, x, y);
}
function drawInk() {
  const w = glCanvas.width, h = glCanvas.height;
  if (ink.width !== w || ink.height !== h) {
    ink.width = w;
    ink.height = h;
  }
  ctx.clearRect(0, 0, w, h);
  if (!vol()) return;
  const items = [...S.annotations];
  const d = S.drag;
  if (d && d.kind === "left" && d.start && d.end && S.tool !== "navigate" && S.tool !== "probe") {
    items.push({ kind: S.tool, plane: planeOfTile(d.tile), slice: d.start[NORMAL_AXIS[planeOfTile(d.tile)]], a: d.start, b: d.end, preview: true });
  }
  for (const a of items) {
    if (!onSlice(a)) continue;
    const p = canvasOf(a.a, a.plane);
    if (!p) continue;
    ctx.strokeStyle = a.kind === "box" ? "#ff5050" : "#00e5ff";
    ctx.lineWidth = 2;
    if (a.kind === "probe") {
      ctx.beginPath();
      ctx.moveTo(p[0] - 6, p[1]); ctx.lineTo(p[0] + 6, p[1]);
      ctx.moveTo(p[0], p[1] - 6); ctx.lineTo(p[0], p[1] + 6);
      ctx.stroke();
      label(`${fmt(a.value, 0)} ${S.args.unit}`, p[0] + 8, p[1] - 8);
      continue;
    }
    const q = canvasOf(a.b, a.plane);
    if (!q) continue;
    if (a.kind === "distance") {
      ctx.beginPath(); ctx.moveTo(p[0], p[1]); ctx.lineTo(q[0], q[1]); ctx.stroke();
      const mm = a.mm ?? distanceMm(a.a, a.b);
      label(`${fmt(mm)} mm`, (p[0] + q[0]) / 2 + 6, (p[1] + q[1]) / 2 - 6);
    } else if (a.kind === "rectangle" || a.kind === "box") {
      ctx.strokeRect(Math.min(p[0], q[0]), Math.min(p[1], q[1]), Math.abs(q[0] - p[0]), Math.abs(q[1] - p[1]));
    } else if (a.kind === "ellipse") {
      ctx.beginPath();
      ctx.ellipse((p[0] + q[0]) / 2, (p[1] + q[1]) / 2, Math.abs(q[0] - p[0]) / 2 || 1, Math.abs(q[1] - p[1]) / 2 || 1, 0, 0, 2 * Math.PI);
      ctx.stroke();
    }
    if (a.stats) {
      const s = a.stats;
      const x = Math.max(p[0], q[0]) + 6, y = Math.min(p[1], q[1]) + 12;
      label(`mean ${fmt(s.mean)} SD ${fmt(s.sd)} ${S.args.unit}`, x, y);
      label(`min ${fmt(s.min, 0)} max ${fmt(s.max, 0)}`, x, y + 15 * (nv.uiData.dpr || 1));
      label(`area ${fmt(s.areaMm2 / 100, 2)} cm²`, x, y + 30 * (nv.uiData.dpr || 1));
    }
  }
}

// ------------------------------------------------------------------ four-corner overlay
function refreshCorners() {
  if (!vol() || !S.args) return;
  const c = S.args.corners || {};
  document.getElementById("c-tl").textContent = (c.tl || []).join("\n");
  document.getElementById("c-tr").textContent = (c.tr || []).join("\n");
  const wl = currentWL();
  document.getElementById("c-bl").textContent =
    `W ${fmt(wl.width, 0)} L ${fmt(wl.level, 0)}${S.invert ? " (inverted)" : ""}\nZoom ${fmt(nv.scene.pan2Dxyzmm[3], 2)}×`;
  const v = crosshairVox();
  const mm = nv.frac2mm(nv.scene.crosshairPos);
  const [, , nz] = dims();
  // slices numbered from the feet up, as the server-rendered viewer and the Run page number them
  document.getElementById("c-br").textContent =
    `Axial ${v[2] + 1}/${nz} · z ${fmt(mm[2])} mm\nThickness ${c.thickness || "–"}`;
}

// ------------------------------------------------------------------ keyboard
function presetByKey(key) {
  return (S.args.presets || []).find((p) => p.key === key);
}
window.addEventListener(
  "keydown",
  (e) => {
    if (!vol() || e.target.tagName === "INPUT") return;
    const t0 = performance.now();
    let handled = true;
    if (e.repeat && e.key.startsWith("Arrow")) S.keyRepeats = (S.keyRepeats || 0) + 1; // a held key
    if (e.key === "ArrowUp" || e.key === "ArrowDown") {
      step(planeOfTile(S.activeTile), e.key === "ArrowUp" ? 1 : -1, t0);
    } else if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
      step(planeOfTile(S.activeTile), e.key === "ArrowRight" ? 1 : -1, t0);
    } else if (e.key === "i" || e.key === "I") {
      setInvert(!S.invert);
    } else if (e.key === " ") {
      resetView();
    } else if (presetByKey(e.key)) {
      const p = presetByKey(e.key);
      setWL(p.width, p.level);
    } else {
      handled = false;
    }
    if (handled) {
      e.preventDefault();
      e.stopPropagation();
    }
  },
  { capture: true },
);

function resetView() {
  // one texture update for window and inversion (each costs a pass over the whole volume,
  // on the CPU where WebGL is software)
  const v = vol();
  S.invert = false;
  v.colormapInvert = false;
  v.cal_min = S.defaultWindow.level - S.defaultWindow.width / 2;
  v.cal_max = S.defaultWindow.level + S.defaultWindow.width / 2;
  nv.updateGLVolume();
  nv.setPan2Dxyzmm([0, 0, 0, 1]);
  nv.scene.crosshairPos = [0.5, 0.5, 0.5];
  nv.createOnLocationChange();
  nv.drawScene();
  drawInk();
  refreshCorners();
}

// ------------------------------------------------------------------ cine
function setCine(on) {
  if (S.cineTimer) clearInterval(S.cineTimer);
  S.cineTimer = null;
  if (on) {
    S.cineTimer = setInterval(() => {
      const plane = planeOfTile(S.activeTile);
      const axis = NORMAL_AXIS[plane];
      const v = crosshairVox();
      const n = dims()[axis];
      const t0 = performance.now();
      if (v[axis] >= n - 1) {
        step(plane, -(n - 1), t0); // wrap to the first slice
      } else {
        step(plane, 1, t0);
      }
      S.cineFrames = (S.cineFrames || 0) + 1;
    }, 1000 / S.fps);
  }
  document.getElementById("cine").textContent = on ? "⏸ Stop cine" : "▶ Cine";
}

// ------------------------------------------------------------------ toolbar
function button(id, text, title, onClick) {
  const b = document.createElement("button");
  b.id = id;
  b.textContent = text;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}
function setTool(tool) {
  S.tool = tool;
  const cfg = nv.getMouseEventConfig ? nv.getMouseEventConfig() : null;
  nv.setMouseEventConfig({
    leftButton: { primary: tool === "navigate" ? DRAG_MODE.windowing : DRAG_MODE.none },
    rightButton: DRAG_MODE.none,
    centerButton: DRAG_MODE.pan,
    ...(cfg && cfg.leftButton ? {} : {}),
  });
  for (const [t] of TOOLS) document.getElementById(`tool-${t}`).classList.toggle("on", t === tool);
}
function buildToolbar() {
  const bar = document.getElementById("toolbar");
  bar.innerHTML = "";
  for (const [t, text, title] of TOOLS) bar.appendChild(button(`tool-${t}`, text, title, () => setTool(t)));
  bar.appendChild(button("clear", "Clear marks", "Remove all measurements", () => { S.annotations = []; drawInk(); }));
  const bar2 = document.getElementById("bar2");
  bar2.innerHTML = "";
  for (const p of S.args.presets || []) {
    bar2.appendChild(button(`preset-${p.key}`, `${p.key} ${p.name}`, `W ${p.width} / L ${p.level} (key ${p.key})`, () => setWL(p.width, p.level)));
  }
  bar2.appendChild(button("invert", "i Invert", "Invert grey scale (key i)", () => setInvert(!S.invert)));
  bar2.appendChild(button("reset", "Reset", "Reset window, zoom, pan and position (space)", resetView));
  bar2.appendChild(button("cine", "▶ Cine", "Play through the slices of the active plane", () => setCine(!S.cineTimer)));
  const fps = document.createElement("input");
  fps.type = "number"; fps.min = "1"; fps.max = "60"; fps.value = String(S.fps); fps.id = "fps"; fps.title = "Cine frames per second";
  fps.addEventListener("change", () => { S.fps = Math.max(1, Math.min(60, Number(fps.value) || 10)); if (S.cineTimer) setCine(true); });
  const fl = document.createElement("label"); fl.textContent = " fps "; fl.appendChild(fps);
  bar2.appendChild(fl);
  for (const entry of S.args.labels || []) {
    const l = document.createElement("label");
    l.className = "lab";
    const cb = document.createElement("input");
    cb.type = "checkbox"; cb.checked = !S.hidden.has(entry.value); cb.id = `label-${entry.value}`;
    cb.addEventListener("change", () => { cb.checked ? S.hidden.delete(entry.value) : S.hidden.add(entry.value); applyLabels(); });
    const sw = document.createElement("span");
    sw.className = "sw"; sw.style.background = `rgb(${entry.colour.join(",")})`;
    l.append(cb, sw, document.createTextNode(entry.name));
    bar2.appendChild(l);
  }
  if ((S.args.labels || []).length) {
    const op = document.createElement("input");
    op.type = "range"; op.min = "0"; op.max = "1"; op.step = "0.05"; op.value = String(S.labelOpacity); op.id = "label-opacity"; op.title = "Overlay opacity";
    op.addEventListener("input", () => { S.labelOpacity = Number(op.value); applyLabels(); });
    const ol = document.createElement("label"); ol.textContent = " opacity "; ol.appendChild(op);
    bar2.appendChild(ol);
  }
  setTool(S.tool);
}

let labelsApplied = null;
function applyLabels() {
  if (nv.volumes.length < 2) return;
  const entries = S.args.labels || [];
  // a rerun of the page re-sends the same labels: redo the overlay only when it changed
  const signature = JSON.stringify([S.labelKey, entries, [...S.hidden].sort(), S.labelOpacity]);
  if (signature === labelsApplied) return;
  labelsApplied = signature;
  const maxValue = Math.max(1, ...entries.map((e) => e.value));
  const R = [], G = [], B = [], A = [], I = [];
  for (let v = 0; v <= maxValue; v++) {
    const e = entries.find((x) => x.value === v);
    const c = e ? e.colour : [0, 0, 0];
    R.push(c[0]); G.push(c[1]); B.push(c[2]); I.push(v);
    A.push(v === 0 || !e || S.hidden.has(v) ? 0 : 255);
  }
  nv.volumes[1].setColormapLabel({ R, G, B, A, I });
  nv.setOpacity(1, S.labelOpacity); // updates the textures once
}

// ------------------------------------------------------------------ loading
function resize() {
  const h = Math.max(200, (S.args && S.args.height) || 560);
  stage.style.height = `${h}px`;
  nv.resizeListener();
  drawInk();
  post("streamlit:setFrameHeight", { height: document.body.scrollHeight });
}

async function loadLabels(args) {
  // the label map alone changes (a run finished, the overlay toggled): the series stays
  while (nv.volumes.length > 1) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
  if (args.labels_url) await nv.addVolumeFromUrl({ url: args.labels_url, name: "labels.nii.gz", opacity: S.labelOpacity });
  S.labelKey = args.labels_url || null;
  S.labelsLoaded = Boolean(args.labels_url);
  applyLabels();
  nv.drawScene();
}

async function load(args) {
  const t0 = performance.now();
  readout.textContent = "Loading the series…";
  const w = args.window;
  await nv.loadVolumes([{ url: args.volume_url, name: "volume.nii.gz", colormap: "gray",
                          cal_min: w.level - w.width / 2, cal_max: w.level + w.width / 2 }]);
  S.timing.loaded = performance.now(); // the volume fetched and decoded
  S.volumeKey = args.volume_url;
  S.labelKey = null;
  S.loads = (S.loads || 0) + 1;
  S.annotations = [];
  S.defaultWindow = args.window;
  setWL(args.window.width, args.window.level);
  nv.setSliceType(SLICE_TYPE.MULTIPLANAR);
  resize();
  nv.drawScene();
  S.firstImageMs = performance.now() - t0;
  S.timing.volumeDrawn = performance.now();
  performance.mark("medai-volume-drawn");
  S.readyAt = performance.timeOrigin + performance.now();
  if (S.firstImageAt === null) markFirstImage();
  document.getElementById("preview").hidden = true;
  refreshCorners();
  const n = (args.presets || []).length;
  const keys = n ? ` · 1-${n} ${args.unit === "HU" ? "CT presets" : "windows (full range, 1-99 %, tissue contrast)"}` : "";
  readout.textContent = args.hint || `Wheel or arrow keys: slices · left-drag: W/L · right-drag: zoom · middle-drag: pan${keys} · i invert · space reset`;
}

// ------------------------------------------------------------------ attaching
// NiiVue compiles its shaders when it attaches, synchronously: seconds under a software
// GL (SwiftShader). shell.js has shown the middle-slice previews before this module loads.
// NiiVue re-computes a gradient volume (a blur and a Sobel pass over every voxel) each
// time the image is re-coloured (a window change, an inversion, a label toggle), for
// lighting its 3-D rendering. This viewport never shows the 3-D rendering
// (SHOW_RENDER.NEVER), and on a software GL those passes cost seconds per change; so
// they run a shader that writes nothing of use and samples nothing. (NiiVue is pinned
// in package-lock.json; the shader names are those of its 0.69 init.)
function skipGradients() {
  const gl = nv.gl;
  const compile = (type, text) => {
    const shader = gl.createShader(type);
    gl.shaderSource(shader, text);
    gl.compileShader(shader);
    return shader;
  };
  const program = gl.createProgram();
  gl.attachShader(program, compile(gl.VERTEX_SHADER,
    "#version 300 es\nvoid main() { vec2 p = vec2(gl_VertexID & 1, gl_VertexID >> 1) * 2.0 - 1.0; gl_Position = vec4(p, 0.0, 1.0); }"));
  gl.attachShader(program, compile(gl.FRAGMENT_SHADER,
    "#version 300 es\nprecision lowp float; out vec4 color; void main() { color = vec4(0.0); }"));
  gl.linkProgram(program);
  if (!gl.getProgramParameter(program, gl.LINK_STATUS)) return; // keep NiiVue's own
  const none = { program, uniforms: {}, use: (g) => g.useProgram(program) };
  for (const name of ["blurShader", "gradientPrePassShader", "sobelFirstOrderShader", "sobelSecondOrderShader"]) {
    if (nv[name]) nv[name] = none;
  }
}

let attachStarted = null;
function attach() {
  if (attachStarted) return attachStarted;
  S.timing.attachStart = performance.now();
  attachStarted = (document.createElement("canvas").getContext("webgl2")
    ? nv.attachToCanvas(glCanvas)
    : Promise.reject(new Error("this browser offers no WebGL2"))
  ).then(() => {
    S.timing.attached = performance.now();
    skipGradients();
    nv.onLocationChange = () => { refreshCorners(); drawInk(); };
  });
  attachStarted.catch(() => {}); // reported by render(), with what to do instead
  return attachStarted;
}
export async function render(args) {
  S.args = args;
  await attach();
  if (args.volume_url !== S.volumeKey) {
    S.hidden = new Set();
    await load(args);
  }
  if ((args.labels_url || null) !== S.labelKey) await loadLabels(args);
  buildToolbar();
  applyLabels();
  resize();
}

// ------------------------------------------------------------------ read-outs for tests and bench
// A checksum of what one tile shows, read back from the WebGL canvas right after a
// draw (the drawing buffer is still valid within the same task).
function tileChecksum(tile) {
  const gl = nv.gl;
  const [l, t, w, h] = nv.screenSlices[tile].leftTopWidthHeight.map((x) => Math.round(x));
  const px = new Uint8Array(w * h * 4);
  gl.readPixels(l, glCanvas.height - t - h, w, h, gl.RGBA, gl.UNSIGNED_BYTE, px);
  let a = 1, b = 0;
  for (let i = 0; i < px.length; i += 4) {
    a = (a + px[i]) % 65521;
    b = (b + a) % 65521;
  }
  return b * 65536 + a; // Adler-32 of the red channel
}
S.api = {
  crosshair: () => crosshairVox(),
  checksum: tileChecksum,
  tiles: () => nv.screenSlices.map((s) => ({ plane: s.axCorSag, ltwh: s.leftTopWidthHeight.map((x) => x / (nv.uiData.dpr || 1)) })),
  draw: () => nv.drawScene(),
  pan: () => Array.from(nv.scene.pan2Dxyzmm),
};

window.addEventListener("resize", () => resize());
S.timing.viewerScript = performance.now();
attach(); // shell.js loads this module when the previews are up, or when the series is slow to come
