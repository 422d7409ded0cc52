#!/usr/bin/env bash
# Runs every workspace test binary N times (round-robin, so a deadline cuts all evenly) and
# prints, per binary, how many runs passed and failed, with the first failure's output kept.
# For hunting tests that fail by chance: run it beside load (a build, stress-ng, a CI run).
#
#   scripts/repeat-tests.sh [-n RUNS] [-d DEADLINE_EPOCH] [-o OUTDIR] [-x EXCLUDE] [FILTER]
#
# FILTER keeps binaries whose name contains it; EXCLUDE drops those whose name contains it. Builds with `cargo test --no-run` first.
# Each run is bounded (REPEAT_RUN_TIMEOUT, default 900 s); the whole loop stops at DEADLINE.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=20 deadline=0 out="" filter="" exclude=""
while (($#)); do
  case "$1" in
    -n) runs="$2"; shift 2 ;;
    -d) deadline="$2"; shift 2 ;;
    -o) out="$2"; shift 2 ;;
    -x) exclude="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) filter="$1"; shift ;;
  esac
done
out="${out:-$(mktemp -d /tmp/repeat-tests.XXXXXX)}"
mkdir -p "$out"
# "executable<TAB>crate dir" per test binary.
mapfile -t bins < <(cargo test --workspace --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test == true)
         | "\(.executable)\t\(.manifest_path | sub("/Cargo.toml$"; ""))"' |
  sort -u | grep -F -- "$filter" | { if [[ -n "$exclude" ]]; then grep -vF -- "$exclude"; else cat; fi; } || true)
((${#bins[@]})) || { echo "repeat-tests: no test binaries"; exit 2; }
declare -A pass fail secs
for b in "${bins[@]}"; do pass[$b]=0 fail[$b]=0 secs[$b]=0; done
echo "repeat-tests: ${#bins[@]} binaries x $runs runs; logs in $out"
done_runs=0
for ((i = 1; i <= runs; i++)); do
  for b in "${bins[@]}"; do
    if ((deadline > 0 && $(date +%s) >= deadline)); then break 2; fi
    exe="${b%%$'\t'*}" dir="${b#*$'\t'}"
    name="$(basename "$exe")"
    t0=$SECONDS
    log="$out/$name.run$i.log"
    # In its crate's directory, as cargo test runs it.
    if (cd "$dir" && timeout "${REPEAT_RUN_TIMEOUT:-900}" "$exe" >"$log" 2>&1); then
      pass[$b]=$((pass[$b] + 1)); rm -f "$log"
    else
      fail[$b]=$((fail[$b] + 1))
      echo "repeat-tests: $name run $i FAILED (log $log): $(grep -m1 -E 'panicked|FAILED|error' "$log" || tail -1 "$log")"
    fi
    secs[$b]=$((secs[$b] + SECONDS - t0))
  done
  done_runs=$i
  echo "repeat-tests: round $i done ($(date +%T))"
done
printf '\nrepeat-tests: %s full rounds\n%-45s %5s %5s %7s\n' "$done_runs" binary passed failed avg_s
total_fail=0
for b in "${bins[@]}"; do
  n=$((pass[$b] + fail[$b]))
  printf '%-45s %5d %5d %7s\n' "$(basename "${b%%$'\t'*}")" "${pass[$b]}" "${fail[$b]}" "$((n ? secs[$b] / n : 0))"
  total_fail=$((total_fail + fail[$b]))
done
((total_fail == 0))
