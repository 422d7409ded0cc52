// Vite builds the console into dist/, which server-side/build.rs embeds into tunnel-server.
// No plugin: esbuild compiles the TSX with Preact's automatic JSX runtime.
import { defineConfig } from "vite";

export default defineConfig({
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    // Everything is served by tunnel-server itself: no inline scripts (the page's policy
    // forbids them) and no module-preload polyfill injected inline.
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    sourcemap: false,
  },
});
