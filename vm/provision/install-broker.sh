#!/bin/sh
# Install and start keylease-kbs on a Debian 12 host the way README.md says ("Setting up a broker",
# "On the broker host"): a venv in /opt/keylease, `keylease-kbs init /etc/keylease`, the
# keylease-kbs system user, the unit from systemd/. Used by vagrant/Vagrantfile on the broker VM.
#
#   install-broker.sh WHEEL_DIR SYSTEMD_DIR EK_ROOTS_PEM [ENROLLMENT]
#
# Prints the broker's agent CA (for /etc/keylease/agent-ca.pem on each worker) to
# /etc/keylease/agent-ca.pem. Offline: installs only the wheels given.
set -eu
wheels=$1 units=$2 ek_roots=$3 enrollment=${4:-manual}

python3 -m venv /opt/keylease
/opt/keylease/bin/pip install -q --no-index --find-links "$wheels" 'keylease[broker]'
ln -sf /opt/keylease/bin/keylease-kbs /usr/local/bin/

if [ ! -f /etc/keylease/kbs.toml ]; then
  keylease-kbs init /etc/keylease --listen 0.0.0.0:8443 --ek-roots "$ek_roots" \
    --enrollment "$enrollment"
  # The service cannot write /etc/keylease: the database lives in its StateDirectory.
  sed -i 's|^database = .*|database = "/var/lib/keylease-kbs/kbs.db"|' /etc/keylease/kbs.toml
  grep -q '^database = ' /etc/keylease/kbs.toml ||
    echo 'database = "/var/lib/keylease-kbs/kbs.db"' >> /etc/keylease/kbs.toml
fi
install -m 0644 "$units"/keylease-kbs.sysusers.conf /etc/sysusers.d/keylease-kbs.conf
systemd-sysusers /etc/sysusers.d/keylease-kbs.conf
chown keylease-kbs:keylease-kbs /etc/keylease/master.key
chown -R keylease-kbs:keylease-kbs /etc/keylease/tls
install -m 0644 "$units"/keylease-kbs.service /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now keylease-kbs.service
keylease-kbs --config /etc/keylease/kbs.toml check-config
