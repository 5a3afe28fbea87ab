#!/usr/bin/env bash
# Regenerate the checked-in gRPC modules from the protos in keylease/api/v1 (keylease.proto: the
# node-facing API; admin.proto: the operators' API) and harness/cri (api.proto: the CRI subset the
# runtime tests drive containerd with).
#   scripts/gen_proto.sh          write the modules
#   scripts/gen_proto.sh --check  fail if the checked-in modules differ from a fresh generation
set -euo pipefail
cd "$(dirname "$0")/.."
protos=(keylease/api/v1/keylease keylease/api/v1/admin harness/cri/api)
if [[ "${1:-}" == "--check" ]]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  for p in "${protos[@]}"; do
    python -m grpc_tools.protoc -I . --python_out="$tmp" --pyi_out="$tmp" \
      --grpc_python_out="$tmp" "$p.proto"
    for f in "${p}_pb2.py" "${p}_pb2.pyi" "${p}_pb2_grpc.py"; do
      if ! cmp -s "$tmp/$f" "$f"; then
        echo "stale generated module $f: run scripts/gen_proto.sh (make proto) and commit" >&2
        exit 1
      fi
    done
  done
  echo "generated modules are current"
  exit 0
fi
for p in "${protos[@]}"; do
  python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. "$p.proto"
done
