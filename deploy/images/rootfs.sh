#!/usr/bin/env bash
# Assembles the root filesystem of one image: the binary, the shared libraries it loads (found
# with ldd), a static CA bundle, passwd/group/nsswitch, and the few directories the programs
# write to. The Dockerfiles run this in their build stage and copy the result into `scratch`;
# build.sh runs it on this machine and `docker import`s the result. Same script, same contents.
#
#   deploy/images/rootfs.sh NAME BINARY OUTDIR
#
#   NAME     tunnel-server | cattle-cluster-agent | cattle-node-agent (installed as
#            /usr/local/bin/NAME)
#   BINARY   the built executable
#   OUTDIR   created (emptied first)
#
# Environment: CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt), STRIP (default 1: drop
# DWARF debug info, keep the symbol table so panics still name functions).
set -euo pipefail

name="${1:?NAME}"; bin="${2:?BINARY}"; out="${3:?OUTDIR}"
ca_bundle="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
die() { printf 'rootfs.sh: %s\n' "$*" >&2; exit 1; }

case "$name" in tunnel-server|cattle-cluster-agent|cattle-node-agent) ;; *) die "unknown image $name" ;; esac
[[ -x "$bin" ]] || die "no executable at $bin"
[[ -s "$ca_bundle" ]] || die "no CA bundle at $ca_bundle (install ca-certificates)"
command -v ldd >/dev/null || die "ldd not found"

# The unprivileged user every image runs as by default (distroless' "nonroot").
uid=65532

rm -rf "$out"
mkdir -p "$out"/{usr/local/bin,etc/ssl/certs,tmp,var/lib}
chmod 1777 "$out/tmp"

install -m 0755 "$bin" "$out/usr/local/bin/$name"
if [[ "${STRIP:-1}" == 1 ]]; then
    command -v objcopy >/dev/null || die "objcopy not found (binutils), or set STRIP=0"
    objcopy --strip-debug "$out/usr/local/bin/$name"
fi

# Shared libraries, at the paths the dynamic loader looks in (ld.so's built-in multiarch
# directories; no ld.so.cache is needed). "linux-vdso.so.1" has no file.
ldd_out="$(ldd "$bin" 2>&1)" || die "ldd $bin: $ldd_out"
if [[ "$ldd_out" == *"not a dynamic executable"* || "$ldd_out" == *"statically linked"* ]]; then
    libs=()
else
    mapfile -t libs < <(awk '
        $2 == "=>" && $3 ~ /^\// { print $3; next }
        $2 == "=>" && $3 == "not" { print "MISSING:" $1; next }
        $1 ~ /^\// { print $1 }' <<<"$ldd_out")
fi
for lib in "${libs[@]}"; do
    [[ "$lib" == MISSING:* ]] && die "ldd: ${lib#MISSING:} not found for $bin"
    mkdir -p "$out$(dirname "$lib")"
    cp -L "$lib" "$out$lib"          # the file itself, under the name the binary asks for
done

install -m 0644 "$ca_bundle" "$out/etc/ssl/certs/ca-certificates.crt"

cat >"$out/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:$uid:$uid:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$out/etc/group" <<GROUP
root:x:0:
nonroot:x:$uid:
GROUP
# glibc >= 2.34 has the files and dns NSS modules built in; this only fixes their order.
printf 'hosts: files dns\n' >"$out/etc/nsswitch.conf"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$out/etc/hosts"
chmod 0644 "$out"/etc/{passwd,group,nsswitch.conf,hosts}

# Writable places, owned by the default user (a read-only root filesystem mounts volumes here).
case "$name" in
    tunnel-server) dirs=(var/lib/tunnel-server) ;;
    cattle-*)      dirs=(var/lib/rancher cattle-credentials) ;;
esac
for d in "${dirs[@]}"; do
    mkdir -p "$out/$d"
    chown "$uid:$uid" "$out/$d"
    chmod 0750 "$out/$d"
done

printf 'rootfs.sh: %s: %s, %d librar%s, %s\n' "$name" "$(du -sh "$out" | cut -f1)" \
    "${#libs[@]}" "$([[ ${#libs[@]} == 1 ]] && echo y || echo ies)" "$out"
