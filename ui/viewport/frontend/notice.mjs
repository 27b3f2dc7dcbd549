// Writes ../NOTICE: every npm package whose code can end up in the bundle (the
// production dependency tree of package-lock.json), its version, licence and
// licence text. Run by scripts/build-viewer after `vite build`.
import { readFileSync, readdirSync, writeFileSync, existsSync } from "node:fs";
import { join } from "node:path";

const lock = JSON.parse(readFileSync("package-lock.json", "utf8"));
const skipped = new Set(["@rollup/rollup-linux-x64-gnu"]); // a native build tool NiiVue lists, never bundled
const rows = [];
for (const [path, meta] of Object.entries(lock.packages)) {
  if (!path || meta.dev || meta.optional) continue;
  const name = path.replace(/^.*node_modules\//, "");
  if (skipped.has(name)) continue;
  const dir = path;
  const files = existsSync(dir) ? readdirSync(dir).filter((f) => /^(licen[sc]e|copying|notice)/i.test(f)) : [];
  const text = files.map((f) => readFileSync(join(dir, f), "utf8").trim()).join("\n\n");
  rows.push({ name, version: meta.version, license: meta.license || "see text", text });
}
rows.sort((a, b) => a.name.localeCompare(b.name));
const out = [
  "medai viewport bundle (ui/viewport/bundle): third-party software notices",
  "",
  "The viewport JavaScript bundle is built with vite from ui/viewport/frontend and",
  "includes the following npm packages (production dependency tree of the pinned",
  "package-lock.json). medai's own code is Apache-2.0.",
  "",
  ...rows.map((r) => `- ${r.name} ${r.version}: ${r.license}`),
  "",
  "numcodecs ships WebAssembly builds of c-blosc (BSD-3-Clause), Zstandard (BSD-3-Clause)",
  "and LZ4 (BSD-2-Clause); the viewport never reads Zarr data, but the bundler keeps them.",
  "",
];
for (const r of rows) {
  out.push("=".repeat(78), `${r.name} ${r.version} (${r.license})`, "-".repeat(78));
  if (r.text) out.push(r.text);
  else if (r.name === "@niivue/niivue") {
    out.push(
      "BSD 2-Clause License (the package states BSD-2-Clause and ships no licence file;",
      "copyright: the NiiVue contributors, https://github.com/niivue/niivue)",
      "",
      "Redistribution and use in source and binary forms, with or without modification, are",
      "permitted provided that the following conditions are met:",
      "1. Redistributions of source code must retain the above copyright notice, this list of",
      "   conditions and the following disclaimer.",
      "2. Redistributions in binary form must reproduce the above copyright notice, this list of",
      "   conditions and the following disclaimer in the documentation and/or other materials",
      "   provided with the distribution.",
      "THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS \"AS IS\" AND ANY EXPRESS",
      "OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF",
      "MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE",
      "COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,",
      "EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE",
      "GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND",
      "ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING",
      "NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED",
      "OF THE POSSIBILITY OF SUCH DAMAGE.",
    );
  } else out.push(`(no licence file in the package; its package.json states ${r.license})`);
  out.push("");
}
writeFileSync("../NOTICE", out.join("\n"));
console.log(`NOTICE: ${rows.length} packages`);
