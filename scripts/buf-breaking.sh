#!/usr/bin/env bash
# buf breaking (FILE rules) of protos/ in the working tree against a git ref (default: main).
# Both sides are compiled by protoc into descriptor images, so neither needs the
# Buf Schema Registry nor the untracked .build/googleapis copy.
set -euo pipefail
against=${1:-main}
py=.venv/bin/python
if ! git rev-parse --verify -q "$against^{commit}" >/dev/null; then
  echo "buf breaking: no ref '$against' to compare against; skipped"; exit 0
fi
if ! git cat-file -e "$against:protos" 2>/dev/null; then
  echo "buf breaking: '$against' has no protos/ yet; nothing can break"; exit 0
fi
googleapis=$($py -c 'import pathlib, google.api.annotations_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')
work=.build/breaking
rm -rf "$work" && mkdir -p "$work/base"
git archive "$against" protos | tar -x -C "$work/base"
image() {  # image ROOT OUT
  (cd "$1" && find . -name '*.proto' | sort) | sed 's|^\./||' >"$work/files"
  $py -m grpc_tools.protoc -I"$1" -I"$googleapis" --include_imports --include_source_info \
    --descriptor_set_out="$2" $(cat "$work/files")
}
image "$work/base/protos" "$work/base.binpb"
image protos "$work/head.binpb"
.venv/bin/buf breaking "$work/head.binpb" --against "$work/base.binpb" \
  --config '{"version": "v2", "breaking": {"use": ["FILE"]}}'
echo "buf breaking: protos/ is compatible with $against"
