#!/usr/bin/env bash
# Builds the Go interop peer to ${CARGO_TARGET_DIR:-<repo>/target}/gopeer/gopeer and prints its
# path. Skips the build when the binary is newer than every Go source file and go.mod/go.sum.
#
# Modules come from the Go module proxy and are checked against the committed go.sum; the build
# never edits go.mod/go.sum (-mod=readonly), so an incomplete go.sum fails here instead of
# drifting. The temporary name and the rename keep concurrent callers from seeing a half binary.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
src="$here/gopeer"
out_dir="${CARGO_TARGET_DIR:-$repo/target}/gopeer"
bin="$out_dir/gopeer"

# remotedialer's newest release needs a newer Go than some machines ship, and the machine's
# go.env may pin GOTOOLCHAIN=local. "auto" lets the go command fetch the toolchain named by
# go.mod's go line (itself a module on the Go module proxy). A caller's explicit setting wins.
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

stale=1
if [[ -x "$bin" ]]; then
  stale=0
  for f in "$src"/*.go "$src"/go.mod "$src"/go.sum; do
    if [[ "$f" -nt "$bin" ]]; then
      stale=1
      break
    fi
  done
fi

if [[ "$stale" == 1 ]]; then
  mkdir -p "$out_dir"
  (cd "$src" && go build -mod=readonly -buildvcs=false -trimpath -o "$bin.tmp.$$" . && mv -f "$bin.tmp.$$" "$bin")
  echo "built $bin" >&2
fi
echo "$bin"
