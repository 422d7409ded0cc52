#!/usr/bin/env bash
# Builds the Go interop programs on the real github.com/rancher/remotedialer and prints their
# paths, one a line:
#
#   build.sh               both: goagent, then gopeer (so the last line is gopeer's, as callers
#                          of the one-program version of this script expect)
#   build.sh NAME...       only these (gopeer, goagent), in this order
#
# Each goes to ${CARGO_TARGET_DIR:-<repo>/target}/gopeer/NAME. A build is skipped when the binary
# is newer than every Go source file and go.mod/go.sum of its directory.
#
# Modules come from the Go module proxy and are checked against the committed go.sum; the build
# never edits go.mod/go.sum (-mod=readonly), so an incomplete go.sum fails here instead of
# drifting. The temporary name and the rename keep concurrent callers from seeing a half binary.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out_dir="${CARGO_TARGET_DIR:-$repo/target}/gopeer"

# remotedialer's newest release needs a newer Go than some machines ship, and the machine's
# go.env may pin GOTOOLCHAIN=local. "auto" lets the go command fetch the toolchain named by
# go.mod's go line (itself a module on the Go module proxy). A caller's explicit setting wins.
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

build() {
  local name="$1" src="$here/$1" bin="$out_dir/$1"
  [[ -f "$src/go.mod" ]] || { echo "build.sh: no Go program $name (expected $src/go.mod)" >&2; exit 2; }
  local stale=1
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
}

(($#)) || set -- goagent gopeer
for name in "$@"; do
  build "$name"
done
