"""The CRI client: protobuf stays in here; callers get frozen dataclasses or a ``CriError``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from harness.cri import api_pb2 as pb
from harness.cri import api_pb2_grpc as pb_grpc

__all__ = ["CriClient", "CriError", "ImageInfo", "PulledImage", "RuntimeVersion"]

CRI_VERSION = "v1"
PULL_TIMEOUT = 120.0
CALL_TIMEOUT = 10.0


class CriError(RuntimeError):
    """A CRI call failed; ``message`` is the runtime's own error text, ``code`` its gRPC status."""

    def __init__(self, rpc: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"CRI {rpc} failed ({code.name}): {message}")
        self.rpc = rpc
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RuntimeVersion:
    runtime_name: str  # "containerd"
    runtime_version: str
    runtime_api_version: str  # "v1"


@dataclass(frozen=True)
class PulledImage:
    image: str  # the reference asked for
    image_ref: str  # what the runtime answered: the image id (its config digest)
    seconds: float  # wall time of the PullImage call


@dataclass(frozen=True)
class ImageInfo:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int


class CriClient:
    """``RuntimeService`` / ``ImageService`` on ``unix://SOCKET``; close it (or use ``with``)."""

    def __init__(self, socket: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self._runtime = pb_grpc.RuntimeServiceStub(self._channel)
        self._images = pb_grpc.ImageServiceStub(self._channel)

    def version(self, timeout: float = CALL_TIMEOUT) -> RuntimeVersion:
        try:
            reply = self._runtime.Version(pb.VersionRequest(version=CRI_VERSION), timeout=timeout)
        except grpc.RpcError as exc:
            raise _error("Version", exc) from None
        return RuntimeVersion(reply.runtime_name, reply.runtime_version, reply.runtime_api_version)

    def pull_image(self, image: str, timeout: float = PULL_TIMEOUT) -> PulledImage:
        """Pull (fetch, decrypt, unpack) ``image`` as kubelet does; CriError if that fails."""
        request = pb.PullImageRequest(image=pb.ImageSpec(image=image))
        started = time.perf_counter()
        try:
            reply = self._images.PullImage(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _error("PullImage", exc) from None
        return PulledImage(image, reply.image_ref, time.perf_counter() - started)

    def image_status(self, image: str, timeout: float = CALL_TIMEOUT) -> ImageInfo | None:
        """The runtime's record of ``image``, or None if it does not have it."""
        request = pb.ImageStatusRequest(image=pb.ImageSpec(image=image))
        try:
            reply = self._images.ImageStatus(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _error("ImageStatus", exc) from None
        if not reply.HasField("image"):
            return None
        found = reply.image
        return ImageInfo(
            found.id, tuple(found.repo_tags), tuple(found.repo_digests), int(found.size)
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _error(rpc: str, exc: grpc.RpcError) -> CriError:
    """The one translation of a gRPC failure: the status code and the runtime's message (a
    sync client's RpcError is also a grpc.Call, which the stubs cannot express)."""
    code_fn, details_fn = getattr(exc, "code", None), getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    return CriError(
        rpc,
        code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
        details if isinstance(details, str) else str(exc),
    )
