#!/bin/sh
# On the broker: approve every pending node with the given labels (the operator's step after the
# workers enrolled). Used by vagrant/Vagrantfile ("approve" provisioner) on the broker VM.
#
#   approve-workers.sh LABEL=VALUE...
set -eu
kbs() { runuser -u keylease-kbs -- keylease-kbs --config /etc/keylease/kbs.toml "$@"; }
labels=""
for l in "$@"; do labels="$labels --label $l"; done
kbs node list --json | python3 -c '
import json, sys
for node in json.load(sys.stdin):
    if node.get("state") == "pending":
        print(node["name"])
' | while read -r node; do
  # shellcheck disable=SC2086
  kbs node approve "$node" $labels
done
kbs node list
