// The viewport's shell: the Streamlit protocol, the page's layout and the first image.
//
// Why a separate, small module: the viewer (main.js, NiiVue) is a large script whose
// WebGL set-up compiles shaders synchronously, seconds on a machine that draws WebGL on
// the CPU. The shell asks Streamlit for the arguments at once, shows the middle slices
// the server sent with them (PNG previews, drawn by medai.viewer), and only then loads
// the viewer; when the arguments are slow to come (the server still reading the
// series), it loads the viewer meanwhile, so its set-up overlaps the wait.

export function post(type, data = {}) {
  window.parent.postMessage({ isStreamlitMessage: true, type, ...data }, "*");
}
let seq = 0;
export function setValue(value) {
  seq += 1;
  post("streamlit:setComponentValue", { value: { ...value, seq }, dataType: "json" });
}

export const S = {
  args: null,
  // epoch ms (performance.timeOrigin + now, comparable with the parent page's clock):
  firstImageAt: null, // the first image on screen (the previews, else the volume)
  readyAt: null, // the volume drawn and every interaction live
  timing: {}, // ms since the viewport's page started: shell, first args, previews, viewer, first frame
};
window.__medaiViewport = S; // tests and bench read timings and annotations here

document.getElementById("root").innerHTML = `
<div class="bar" id="toolbar"></div>
<div class="bar" id="bar2"></div>
<div id="stage">
  <canvas id="gl" tabindex="0"></canvas>
  <div id="preview" hidden></div>
  <canvas id="ink"></canvas>
  <div class="corner tl" id="c-tl"></div><div class="corner tr" id="c-tr"></div>
  <div class="corner bl" id="c-bl"></div><div class="corner br" id="c-br"></div>
</div>
<div class="bar" id="readout">Loading…</div>`;

export function markFirstImage() {
  S.firstImageAt = performance.timeOrigin + performance.now();
  S.timing.firstImage = performance.now();
  performance.mark("medai-first-image");
}

async function showPreview(args) {
  const urls = args.previews || [];
  if (!urls.length || S.firstImageAt !== null) return;
  const images = urls.map((url) => { const img = new Image(); img.src = url; img.alt = ""; return img; });
  await Promise.all(images.map((img) => img.decode().catch(() => {})));
  const box = document.getElementById("preview");
  box.replaceChildren(...images);
  box.hidden = false;
  document.getElementById("readout").textContent = "Middle slices shown; the whole series is loading…";
  document.getElementById("stage").style.height = `${Math.max(200, args.height || 560)}px`;
  post("streamlit:setFrameHeight", { height: document.body.scrollHeight });
  // wait for the frame that shows them before loading the viewer (whose set-up blocks
  // this page), but not forever: a page in a background tab draws no frames
  const painted = new Promise((resolve) => requestAnimationFrame(() => setTimeout(() => {
    if (S.firstImageAt === null) markFirstImage();
    resolve();
  }, 0)));
  await Promise.race([painted, new Promise((resolve) => setTimeout(resolve, 1500))]);
}

let viewer = null;
function loadViewer() {
  if (!viewer) {
    S.timing.viewerRequested = performance.now();
    viewer = import("./main.js");
  }
  return viewer;
}
const LOAD_VIEWER_ANYWAY_MS = 300;
setTimeout(() => { if (S.args === null) loadViewer(); }, LOAD_VIEWER_ANYWAY_MS);

function fail(err) {
  document.getElementById("readout").textContent = `Cannot show this series in the browser (${err.message || err}): ` +
    "choose 'Simple (server images)' above the viewer.";
}

// one render at a time, in order: a rerun's message arriving while the series is still
// loading must not start a second load of the same series
let rendering = Promise.resolve();
window.addEventListener("message", (event) => {
  const data = event.data;
  if (!data || data.type !== "streamlit:render") return;
  const first = S.args === null;
  if (first) {
    S.timing.firstArgs = performance.now();
    S.args = data.args;
  }
  rendering = rendering
    .then(() => (first ? showPreview(data.args) : null))
    .then(() => loadViewer())
    .then((mod) => mod.render(data.args))
    .catch(fail);
});
S.timing.shell = performance.now();
post("streamlit:componentReady", { apiVersion: 1 });
