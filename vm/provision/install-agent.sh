#!/bin/sh
# Install keylease-agent on a Debian 12 worker the way README.md says: a venv in /opt/keylease,
# symlinks in /usr/local/bin, the units from systemd/, /etc/keylease/agent.toml.
# Used by the VM acceptance test (run in the guest's root file system while the image is built)
# and by vagrant/Vagrantfile (run on each worker VM). Offline: installs only the wheels given.
#
#   install-agent.sh WHEEL_DIR SYSTEMD_DIR KBS_HOST:PORT [NODE_NAME]
#
# The broker's agent CA must be copied to /etc/keylease/agent-ca.pem (before the agent starts).
# Needs: python3-venv, libtss2 runtime libraries (libtss2-esys-3.0.2-0 libtss2-tctildr0
# libtss2-tcti-device0 libtss2-fapi1 libtss2-rc0), tpm-udev.
set -eu
wheels=$1 units=$2 kbs=$3 node=${4:-}

python3 -m venv /opt/keylease
# The agent extra only: a worker gets nothing of the broker (no SQLAlchemy, PostgreSQL driver...).
/opt/keylease/bin/pip install -q --no-index --find-links "$wheels" 'keylease[agent]'
ln -sf /opt/keylease/bin/keylease-agent /usr/local/bin/

install -m 0644 "$units"/keylease-agent.service "$units"/etc-*-keylease.mount /etc/systemd/system/
install -m 0644 "$units"/keylease.tmpfiles.conf /etc/tmpfiles.d/keylease.conf
# (in a chroot, systemd-tmpfiles-setup.service applies it at the first boot)
if [ -d /proc/self ]; then systemd-tmpfiles --create /etc/tmpfiles.d/keylease.conf; fi

install -d -m 0755 /etc/keylease
{
  echo "kbs = \"$kbs\""
  echo 'kbs_ca = "/etc/keylease/agent-ca.pem"'
  echo 'tcti = "device:/dev/tpmrm0"'
  if [ -n "$node" ]; then echo "node_name = \"$node\""; fi
  echo 'retry_max_seconds = 5'
} > /etc/keylease/agent.toml

# Offline enablement (works in a chroot as well as on a running system).
systemctl enable etc-crio-keys-keylease.mount etc-containerd-ocicrypt-keys-keylease.mount
systemctl enable keylease-agent.service
if [ -d /run/systemd/system ] && [ -f /etc/keylease/agent-ca.pem ]; then
  systemctl daemon-reload
  systemctl start etc-crio-keys-keylease.mount etc-containerd-ocicrypt-keys-keylease.mount
  systemctl start keylease-agent.service
fi
