#!/usr/bin/env bash
# Install what keylease needs on a fresh Debian 12 machine, then the Python environment (.venv).
# Idempotent and quick when everything is already there. Run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config gnutls-bin skopeo
              build-essential python3-venv python3-dev ca-certificates
              libsystemd-dev systemd postgresql
              qemu-system-x86 qemu-utils ovmf mmdebstrap netcat-openbsd e2fsprogs)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

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
