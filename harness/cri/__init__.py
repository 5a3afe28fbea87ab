"""A minimal typed client of the Kubernetes CRI (``runtime.v1``), the API kubelet drives a
container runtime through: the runtime's version and image pulls, over the runtime's unix socket.

``api.proto`` is the upstream CRI's subset these use (same package, services and field
numbers; ``tests/system/test_runtimes.py`` checks it against Debian's copy of upstream); its
generated modules are checked in (``make proto``).
"""

from harness.cri.client import CriClient, CriError, ImageInfo, PulledImage, RuntimeVersion

__all__ = ["CriClient", "CriError", "ImageInfo", "PulledImage", "RuntimeVersion"]
