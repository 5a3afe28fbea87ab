#!/usr/bin/env bash
# Install what keylease needs on a fresh Debian 12 machine, then the Python environment (.venv).
# Idempotent and quick when everything is already there. Run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

# The container runtimes the tests drive (tests/system/test_runtimes.py): containerd + runc
# (through the CRI), Debian's registry (served on 127.0.0.1 by the tests), buildah and podman,
# busybox-static (the one program in the test images), patchelf (for setup-trixie.sh).
# The fault-injection tests (tests/system/test_faults.py) kill a process at an exact system call
# with strace (a process's wall clock is made to jump by harness/wallclock.c, built with gcc).
RUNTIME_PACKAGES=(containerd runc docker-registry buildah podman conmon busybox-static patchelf)
APT_PACKAGES=(swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config gnutls-bin skopeo
              build-essential python3-venv python3-dev ca-certificates
              libsystemd-dev systemd postgresql
              qemu-system-x86 qemu-utils ovmf mmdebstrap netcat-openbsd e2fsprogs faketime
              strace
              "${RUNTIME_PACKAGES[@]}")
# Services these packages enable that the tests never use (each test starts its own, private
# and on loopback); Debian's registry would otherwise listen on every address (:5000).
UNUSED_SERVICES=(docker-registry.service containerd.service)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [[ -d /run/systemd/system ]]; then
    for unit in "${UNUSED_SERVICES[@]}"; do
      package=${unit%.service}
      if [[ " ${missing[*]} " == *" $package "* ]]; then  # only what this run installed
        $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true
      fi
    done
  fi
fi
$SUDO env KEYLEASE_TRIXIE_CACHE="${KEYLEASE_TRIXIE_CACHE:-/var/cache/keylease-trixie}" \
  bash scripts/setup-trixie.sh

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.keylease-setup"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
