#!/usr/bin/env bash
# Builds the three container images WITHOUT a registry or a base image: for each, the root
# filesystem that the Dockerfile's build stage makes (deploy/images/rootfs.sh: the binary from
# this machine's cargo target dir, its shared libraries via ldd, a static CA bundle), piped into
# `docker import` with the Dockerfile's final-stage USER/WORKDIR/ENV/ENTRYPOINT/CMD/EXPOSE lines
# as --change. So the image equals what `docker build -f deploy/images/NAME.Dockerfile .` makes,
# apart from the compiler image used to build the binary.
#
#   deploy/images/build.sh [options] [NAME...]      NAME: tunnel-server cattle-cluster-agent
#                                                         cattle-node-agent (default: all three)
#   --docker-host URL   daemon to load into (default: $DOCKER_HOST, else the docker default)
#   --profile P         cargo profile whose binaries to use: release (default) or debug
#   --cargo MODE        auto (default): run `cargo build` only when a binary is missing or older
#                       than a source file of the workspace; always; never
#   --tag TAG           image tag (default dev): tunnel-project/NAME:TAG
#   --repo PREFIX       image name prefix (default tunnel-project)
#
# Prints one line per image: name, id, size. Environment: CARGO_TARGET_DIR (default
# <repo>/target), CA_BUNDLE and STRIP (see rootfs.sh), WORK (scratch dir, default mktemp).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

profile=release cargo_mode=auto tag=dev prefix=tunnel-project names=()
while (($#)); do
    case "$1" in
        --docker-host) export DOCKER_HOST="$2"; shift 2 ;;
        --profile) profile="$2"; shift 2 ;;
        --cargo) cargo_mode="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --repo) prefix="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
        *) names+=("$1"); shift ;;
    esac
done
((${#names[@]})) || names=(tunnel-server cattle-cluster-agent cattle-node-agent)
case "$profile" in release|debug) ;; *) echo "build.sh: --profile release|debug" >&2; exit 2 ;; esac
case "$cargo_mode" in auto|always|never) ;; *) echo "build.sh: --cargo auto|always|never" >&2; exit 2 ;; esac

log() { printf '[build.sh] %s\n' "$*"; }
die() { printf '[build.sh] FAIL %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker CLI not found"
timeout 10 docker version >/dev/null 2>&1 || die "no Docker daemon answers at ${DOCKER_HOST:-the default socket}"

target_dir="${CARGO_TARGET_DIR:-$repo/target}"
package_of() {
    case "$1" in
        tunnel-server) echo server-side ;;
        cattle-cluster-agent) echo agent-cluster ;;
        cattle-node-agent) echo agent-node ;;
        *) die "unknown image $1 (tunnel-server, cattle-cluster-agent, cattle-node-agent)" ;;
    esac
}

# --- binaries
stale=()
for n in "${names[@]}"; do
    package_of "$n" >/dev/null
    b="$target_dir/$profile/$n"
    if [[ "$cargo_mode" == always || ! -x "$b" ]]; then
        stale+=("$n")
    elif [[ "$cargo_mode" == auto ]] && [[ -n "$(find "$repo"/{tunnel-proto,agent-core,agent-cluster,agent-node,server-side}/src \
            "$repo/deploy/templates" "$repo/Cargo.lock" -newer "$b" -print -quit 2>/dev/null)" ]]; then
        stale+=("$n")
    fi
done
if ((${#stale[@]})); then
    [[ "$cargo_mode" != never ]] || die "missing binaries for ${stale[*]} in $target_dir/$profile (--cargo never)"
    args=(build --locked)
    [[ "$profile" == release ]] && args+=(--release)
    for n in "${stale[@]}"; do args+=(-p "$(package_of "$n")" --bin "$n"); done
    log "cargo ${args[*]}"
    (cd "$repo" && cargo "${args[@]}")
fi

# --- images
work="${WORK:-$(mktemp -d /tmp/tunnel-images.XXXXXX)}"
cleanup() { if [[ -z "${WORK:-}" ]]; then rm -rf "$work"; fi; }
trap cleanup EXIT

# The Dockerfile's final stage, as --change arguments (exactly the lines after the last FROM).
changes_from_dockerfile() {
    local df="$1" line instr
    local -a stage=()
    mapfile -t stage < <(awk '/^FROM[ \t]/ { n = NR } { lines[NR] = $0 } END { for (i = n + 1; i <= NR; i++) print lines[i] }' "$df")
    for line in "${stage[@]}"; do
        [[ -z "${line// }" || "$line" == \#* ]] && continue
        [[ "$line" == *\\ ]] && die "$df: continued line in the final stage: $line"
        instr="${line%%[[:space:]]*}"
        case "${instr^^}" in
            USER|WORKDIR|ENV|ENTRYPOINT|CMD|EXPOSE) printf '%s\n' "$line" ;;
            COPY) [[ "$line" =~ ^COPY[[:space:]]+--from=build[[:space:]]+/rootfs/[[:space:]]+/$ ]] ||
                      die "$df: the final stage may only COPY --from=build /rootfs/ /, got: $line" ;;
            *) die "$df: build.sh cannot replay '$instr' with docker import: $line" ;;
        esac
    done
}

for n in "${names[@]}"; do
    df="$here/$n.Dockerfile"
    [[ -s "$df" ]] || die "no $df"
    image="$prefix/$n:$tag"
    "$here/rootfs.sh" "$n" "$target_dir/$profile/$n" "$work/$n" >/dev/null
    mapfile -t changes < <(changes_from_dockerfile "$df")
    change_args=()
    for c in "${changes[@]}"; do change_args+=(--change "$c"); done
    id="$(tar -C "$work/$n" --numeric-owner --sort=name --mtime='2000-01-01 00:00Z' -cf - . |
        docker import "${change_args[@]}" --message "deploy/images/build.sh $n ($profile)" - "$image")"
    size="$(docker image inspect -f '{{.Size}}' "$image")"
    printf '%-42s %s %6.1f MB\n' "$image" "${id:7:12}" "$(awk -v s="$size" 'BEGIN { print s / 1e6 }')" | sed 's/^/[build.sh] /'
done
