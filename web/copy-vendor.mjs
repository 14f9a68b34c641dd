// Copy the wasm build of ONNX Runtime Web (installed from npm by `npm ci`) into the
// Python package, where `napari-medsam serve` serves it as /static/vendor/.
// Run by `npm run build`, by setup.py's build_py when vendor/ is missing, and by .ci/run.
import { copyFileSync, mkdirSync, existsSync, writeFileSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const src = join(here, "node_modules", "onnxruntime-web");
const dist = join(src, "dist");
const out = join(here, "..", "src", "napari_medsam", "server", "static", "vendor");
const files = ["ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs"];

if (!existsSync(dist)) {
  console.error("onnxruntime-web is not installed: run `npm ci` in web/ first");
  process.exit(1);
}
mkdirSync(out, { recursive: true });
for (const f of files) copyFileSync(join(dist, f), join(out, f));
for (const lic of ["LICENSE", "LICENSE.txt", "README.md"]) {
  if (existsSync(join(src, lic))) copyFileSync(join(src, lic), join(out, `onnxruntime-web-${lic}`));
}
const version = JSON.parse(readFileSync(join(src, "package.json"), "utf8")).version;
writeFileSync(join(out, "VERSION"), `onnxruntime-web ${version}\n`);
console.log(`copied onnxruntime-web ${version} (${files.join(", ")}) to ${out}`);
