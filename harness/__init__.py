"""The real-component harness shared by the tests, the benchmarks and the demo.

swtpm TPMs provisioned with EK certificates, a broker subprocess over TLS, agent configs, OCI
images and skopeo, a private PostgreSQL, netlink and network helpers, and the container runtimes
(``runtimes`` finds them; ``registry``, ``containerd`` with a CRI client in ``cri``, ``podman``).
Nothing here mocks a component; each module starts or drives the real thing.
"""
