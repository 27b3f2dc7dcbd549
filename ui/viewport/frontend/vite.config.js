// Built into ../bundle (shipped inside the Python package): relative asset paths so
// Streamlit's component server can serve it from /component/<name>/, no CDN, no inlined
// remote URLs; source maps left out to keep the wheel small.
import { defineConfig } from "vite";

export default defineConfig({
  base: "./",
  build: {
    outDir: "../bundle",
    emptyOutDir: true,
    sourcemap: false,
    chunkSizeWarningLimit: 4096,
    assetsInlineLimit: 0,
  },
});
