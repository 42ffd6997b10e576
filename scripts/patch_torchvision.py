"""Make PyPI's torchvision importable beside the CPU build of torch.

Why: PyPI ships torchvision only as a CUDA build. Beside ``torch==2.13.0+cpu`` its compiled ops (``_C.so``) do
not load, and ``torchvision/_meta_registrations.py`` then fails on two *unguarded* ``register_fake`` calls
(``torchvision::nms``/``qnms``) with ``RuntimeError: operator torchvision::nms does not exist``. transformers 5.x
needs ``import torchvision`` to succeed to build Qwen-VL processors (the video half), and vLLM builds those.
The other registrations in that file are already guarded by ``torchvision.extension._has_ops()``; this script
guards the two that are not, the same way. Pure-Python transforms (all we use) work without the compiled ops.

Idempotent; a no-op when torchvision imports cleanly (GPU clusters with a matching CUDA torch).
Usage: ``python scripts/patch_torchvision.py`` inside the environment to fix.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

MARKER = "# rms_ray: guarded register_fake"
GUARD = '''
def _rms_ray_register_fake(name):  {marker}
    def wrapper(fn):
        if torchvision.extension._has_ops():
            return torch.library.register_fake(name)(fn)
        return fn
    return wrapper

'''


def _imports_cleanly() -> bool:
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision not installed: nothing to patch")
        return 0
    if _imports_cleanly():
        print("torchvision imports cleanly: nothing to patch")
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARKER not in text:
        text = text.replace("\n\n@functools.lru_cache(None)", GUARD.format(marker=MARKER) + "\n@functools.lru_cache(None)", 1)
        text = text.replace("@torch.library.register_fake(", "@_rms_ray_register_fake(")
        path.write_text(text)
    if not _imports_cleanly():
        print(f"patched {path} but torchvision still fails to import", file=sys.stderr)
        return 1
    print(f"patched {path}: torchvision now imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
