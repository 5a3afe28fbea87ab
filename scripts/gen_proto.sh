#!/usr/bin/env bash
# Regenerate the checked-in gRPC modules from kbs/api/v1/keylease.proto.
#   scripts/gen_proto.sh          write the modules
#   scripts/gen_proto.sh --check  fail if the checked-in modules differ from a fresh generation
set -euo pipefail
cd "$(dirname "$0")/.."
out=kbs/api/v1
if [[ "${1:-}" == "--check" ]]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  python -m grpc_tools.protoc -I . --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
    "$out/keylease.proto"
  for f in keylease_pb2.py keylease_pb2.pyi keylease_pb2_grpc.py; do
    if ! cmp -s "$tmp/$out/$f" "$out/$f"; then
      echo "stale generated module $out/$f: run scripts/gen_proto.sh (make proto) and commit" >&2
      exit 1
    fi
  done
  echo "generated modules are current"
  exit 0
fi
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. "$out/keylease.proto"
