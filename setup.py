"""Build hook: ship ONNX Runtime Web (from npm) inside the wheel and the sdist.

``napari-medsam serve`` runs the mask decoder in the browser with ONNX Runtime Web.
Its JavaScript and wasm files are fetched from the npm registry at build time
(``web/package-lock.json`` pins the version) and copied into
``src/napari_medsam/server/static/vendor/`` (git-ignored, never committed); both
``build_py`` (wheels, editable installs) and ``sdist`` run that step when the
folder is missing. Everything else is in setup.cfg.
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR = os.path.join(HERE, "src", "napari_medsam", "server", "static", "vendor")
WEB = os.path.join(HERE, "web")
NEEDED = ("ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs")


def ensure_vendor() -> None:
    if all(os.path.exists(os.path.join(VENDOR, f)) for f in NEEDED):
        return
    npm = shutil.which("npm")
    if npm is None or not os.path.exists(os.path.join(WEB, "package.json")):
        print(
            "warning: npm or web/ missing: ONNX Runtime Web not bundled; `napari-medsam serve` "
            "will decode previews on the server"
        )
        return
    subprocess.check_call([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB)
    subprocess.check_call([npm, "run", "build"], cwd=WEB)


class BuildPy(build_py):
    def run(self):
        ensure_vendor()
        super().run()


class Sdist(sdist):
    def run(self):
        ensure_vendor()
        super().run()


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
