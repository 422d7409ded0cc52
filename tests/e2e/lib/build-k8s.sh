#!/usr/bin/env bash
# Build a REAL kube-apiserver, kubectl, etcd, the rest of a cluster (kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy) and cri-dockerd from their Go modules (through the Go
# module proxy), cached under $E2E_CACHE (default ~/.cache/tunnel-e2e).
#
#   tests/e2e/lib/build-k8s.sh [all|kube-apiserver|kubectl|etcd|cluster|cri-dockerd|paths|clean]
#
#   all (default)    build everything below (each skipped when the cached binary reports
#                    the expected version)
#   kube-apiserver   only kube-apiserver
#   kubectl          only kubectl (the apiserver's own release: Debian's
#                    kubectl is far outside the +-1 minor version skew policy)
#   etcd             only etcd
#   cluster          kube-controller-manager kube-scheduler kubelet kube-proxy, in ONE
#                    `go build -o DIR/ pkg...` (they share most of their packages)
#   cri-dockerd      cri-dockerd (CRI in front of Docker, for cluster.sh's kubelets)
#   paths            print K8S_VERSION=..., KUBE_APISERVER=..., KUBECTL=..., ETCD=...,
#                    KUBE_CONTROLLER_MANAGER=..., KUBE_SCHEDULER=..., KUBELET=...,
#                    KUBE_PROXY=..., CRI_DOCKERD=... (no build)
#   clean            remove the cached build dirs of the selected versions
#
# Environment:
#   K8S_VERSION          Kubernetes release (default v1.37.2)
#   ETCD_VERSION         etcd 3.5 release   (default v3.5.35)
#   CRI_DOCKERD_VERSION  cri-dockerd        (default v0.3.14; see below why not 0.4)
#   E2E_CACHE            cache root         (default $HOME/.cache/tunnel-e2e)
#   E2E_BUILD_P          go build -p        (default 2)
#
# How: a throwaway Go module $E2E_CACHE/k8s-<version>/ requires
# k8s.io/kubernetes@<version>; every k8s.io staging module that kubernetes'
# own go.mod replaces with ./staging/src/k8s.io/<name> is replaced here with
# the published k8s.io/<name> v0.<minor>.<patch>. Then
# `go build k8s.io/kubernetes/cmd/kube-apiserver`. etcd likewise from
# go.etcd.io/etcd/server/v3@<version> (its root package is `main`), cri-dockerd from
# github.com/Mirantis/cri-dockerd@<version> with its own replace block copied.
# Builds run under `nice -n 19 ionice -c3`; only one build at a time (flock).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.5.35}"
E2E_BUILD_P="${E2E_BUILD_P:-2}"

K8S_DIR="$E2E_CACHE/k8s-$K8S_VERSION"
ETCD_DIR="$E2E_CACHE/etcd-$ETCD_VERSION"
KUBE_APISERVER="$K8S_DIR/bin/kube-apiserver"
KUBECTL="$K8S_DIR/bin/kubectl"
ETCD="$ETCD_DIR/bin/etcd"
# The rest of a cluster (tests/e2e/lib/cluster.sh), built together in one go build.
CLUSTER_CMDS=(kube-controller-manager kube-scheduler kubelet kube-proxy)
# v0.3.14, not v0.4.x: 0.4 refuses Docker API < 1.42 (Docker 23+) at start-up ("docker API
# version is older than 1.42.0"), and Debian 12's docker.io is 20.10.24 (API 1.41). 0.3.14 needs
# API >= 1.26. (The module proxy here serves v0.3.14 and v0.4.0, not v0.3.15/16.)
CRI_DOCKERD_VERSION="${CRI_DOCKERD_VERSION:-v0.3.14}"
CRI_DOCKERD_DIR="$E2E_CACHE/cri-dockerd-$CRI_DOCKERD_VERSION"
CRI_DOCKERD="$CRI_DOCKERD_DIR/bin/cri-dockerd"

export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
export GOTOOLCHAIN=local

kube_apiserver_ok() {
    [[ -x "$KUBE_APISERVER" ]] &&
        [[ "$("$KUBE_APISERVER" --version 2>/dev/null)" == "Kubernetes $K8S_VERSION" ]]
}
kubectl_version() { "$KUBECTL" version --client -o json 2>/dev/null | jq -r .clientVersion.gitVersion 2>/dev/null || true; }
kubectl_ok() { [[ -x "$KUBECTL" ]] && [[ "$(kubectl_version)" == "$K8S_VERSION" ]]; }
# k8s_cmd_ok NAME: the cached k8s.io/kubernetes/cmd/NAME binary reports $K8S_VERSION
# (kubectl via `version --client`, every other command via `--version`).
k8s_cmd_ok() {
    if [[ "$1" == kubectl ]]; then kubectl_ok; return; fi
    [[ -x "$K8S_DIR/bin/$1" ]] && [[ "$("$K8S_DIR/bin/$1" --version 2>/dev/null)" == "Kubernetes $K8S_VERSION" ]]
}
k8s_cmd_version() {
    if [[ "$1" == kubectl ]]; then echo "kubectl $(kubectl_version)"; else "$K8S_DIR/bin/$1" --version; fi
}
# first line of `etcd --version` (no `| head`: SIGPIPE + pipefail)
etcd_version() { local v; v="$("$ETCD" --version 2>/dev/null || true)"; echo "${v%%$'\n'*}"; }
etcd_ok() {
    [[ -x "$ETCD" ]] &&
        [[ "$(etcd_version)" == "etcd Version: ${ETCD_VERSION#v}" ]]
}

fmt_dur() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# k8s_prepare_module: write $K8S_DIR/go.mod (k8s.io/kubernetes $K8S_VERSION with its staging
# modules pinned to the published v0.<minor>.<patch>). Sets K8S_MAJOR/K8S_MINOR.
k8s_prepare_module() {
    need_cmd go jq
    local ver="${K8S_VERSION#v}" patch
    IFS=. read -r K8S_MAJOR K8S_MINOR patch <<<"${ver%%-*}"
    [[ "$K8S_MAJOR" == 1 ]] || die "unexpected K8S_VERSION $K8S_VERSION"
    local staging_ver="v0.${K8S_MINOR}.${patch}"
    mkdir -p "$K8S_DIR/bin"
    cd "$K8S_DIR"

    info "fetching k8s.io/kubernetes@$K8S_VERSION go.mod from the Go module proxy"
    local kmod
    kmod="$(cd "$K8S_DIR" && GOFLAGS='' timeout 1800 go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | jq -r .GoMod)"
    [[ -s "$kmod" ]] || die "could not download k8s.io/kubernetes@$K8S_VERSION"
    local goline
    goline="$(grep -m1 -E '^go [0-9]' "$kmod")"
    info "kubernetes go.mod: $goline; local toolchain: $(go version)"

    # Staging modules: "k8s.io/x => ./staging/src/k8s.io/x" lines.
    local staging
    staging="$(sed -nE 's#^[[:space:]]*(k8s\.io/[A-Za-z0-9._-]+)[[:space:]]+=>[[:space:]]+\./staging/src/.*#\1#p' "$kmod" | sort -u)"
    [[ -n "$staging" ]] || die "found no staging replace directives in $kmod"
    info "$(wc -l <<<"$staging") staging modules pinned to $staging_ver"

    {
        echo "// Generated by tests/e2e/lib/build-k8s.sh: throwaway module to build Kubernetes commands."
        echo "module tpe2e.local/k8s-build"
        echo
        echo "$goline"
        echo
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo
        echo "replace ("
        local m
        while read -r m; do echo "	$m => $m $staging_ver"; done <<<"$staging"
        echo ")"
    } >go.mod.new
    # `go get` adds requirements to go.mod: compare with what was generated last time (kept in
    # go.mod.gen), so that building a second command reuses the resolved module.
    if ! cmp -s go.mod.new go.mod.gen 2>/dev/null || [[ ! -s go.mod ]]; then
        cp go.mod.new go.mod
        mv go.mod.new go.mod.gen
        rm -f go.sum
    else
        rm -f go.mod.new
    fi
}

# build_k8s_cmds NAME...: go build k8s.io/kubernetes/cmd/NAME... at $K8S_VERSION into
# $K8S_DIR/bin, all in ONE `go build -o DIR/` so the packages they share (client-go,
# apimachinery, component-base, ...) are compiled once. Cached ones are skipped.
build_k8s_cmds() {
    local cmd todo=()
    step "$* $K8S_VERSION -> $K8S_DIR/bin/"
    for cmd in "$@"; do
        if k8s_cmd_ok "$cmd"; then
            ok "cached: $cmd: $(k8s_cmd_version "$cmd") (skip build)"
        else
            todo+=("$cmd")
        fi
    done
    ((${#todo[@]})) || return 0
    local t0=$SECONDS
    k8s_prepare_module

    local pkgs=()
    for cmd in "${todo[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$cmd"); done
    info "resolving dependencies (go get ${pkgs[*]/%/@$K8S_VERSION})"
    local t1=$SECONDS
    heavy timeout 3600 go get "${pkgs[@]/%/@$K8S_VERSION}"
    info "dependencies resolved in $(fmt_dur $((SECONDS - t1)))"

    local ldflags="-s -w"
    local pkg=k8s.io/component-base/version
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$K8S_MAJOR -X $pkg.gitMinor=$K8S_MINOR"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    info "go build -p $E2E_BUILD_P ${todo[*]} (nice -n 19 ionice -c3; this takes a long while on 2 cores)"
    t1=$SECONDS
    local tmp="$K8S_DIR/bin/.tmp"
    rm -rf "$tmp"; mkdir -p "$tmp"
    # -o DIR/ with several main packages writes DIR/<name> for each.
    heavy timeout 10800 go build -p "$E2E_BUILD_P" -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}"
    for cmd in "${todo[@]}"; do mv "$tmp/$cmd" "$K8S_DIR/bin/$cmd"; done
    rmdir "$tmp"
    local dt=$((SECONDS - t1))
    for cmd in "${todo[@]}"; do
        k8s_cmd_ok "$cmd" || die "built $cmd does not report $K8S_VERSION: $(k8s_cmd_version "$cmd" 2>&1)"
    done
    local joined; joined="$(IFS=+; echo "${todo[*]}")"
    echo "$(date -u +%FT%TZ) $joined $K8S_VERSION go-build=${dt}s total=$((SECONDS - t0))s $(go version)" >>"$E2E_CACHE/build-times.log"
    ok "${todo[*]} ($K8S_VERSION) built: go build $(fmt_dur "$dt"), total $(fmt_dur $((SECONDS - t0)))"
}
build_k8s_cmd() { build_k8s_cmds "$1"; }

build_etcd() {
    step "etcd $ETCD_VERSION -> $ETCD"
    if etcd_ok; then
        ok "cached: $(etcd_version) (skip build)"
        return 0
    fi
    need_cmd go jq
    local t0=$SECONDS
    mkdir -p "$ETCD_DIR/bin"
    cd "$ETCD_DIR"
    local emod goline
    emod="$(cd "$ETCD_DIR" && GOFLAGS='' timeout 1800 go mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION" | jq -r .GoMod)"
    [[ -s "$emod" ]] || die "could not download go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    goline="$(grep -m1 -E '^go [0-9]' "$emod")"
    info "etcd server go.mod: $goline"
    {
        echo "// Generated by tests/e2e/lib/build-k8s.sh: throwaway module to build etcd."
        echo "module tpe2e.local/etcd-build"
        echo
        echo "$goline"
        echo
        echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    } >go.mod.new
    if ! cmp -s go.mod.new go.mod 2>/dev/null; then
        mv go.mod.new go.mod
        rm -f go.sum
    else
        rm -f go.mod.new
    fi
    info "resolving dependencies"
    local t1=$SECONDS
    heavy timeout 1800 go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    info "dependencies resolved in $(fmt_dur $((SECONDS - t1)))"
    info "go build -p $E2E_BUILD_P (nice -n 19 ionice -c3)"
    t1=$SECONDS
    heavy timeout 3600 go build -p "$E2E_BUILD_P" -trimpath -ldflags "-s -w" \
        -o "$ETCD.tmp" go.etcd.io/etcd/server/v3
    mv "$ETCD.tmp" "$ETCD"
    local dt=$((SECONDS - t1))
    etcd_ok || die "built etcd does not report $ETCD_VERSION: $("$ETCD" --version 2>&1)"
    echo "$(date -u +%FT%TZ) etcd $ETCD_VERSION go-build=${dt}s total=$((SECONDS - t0))s $(go version)" >>"$E2E_CACHE/build-times.log"
    ok "$(etcd_version) built: go build $(fmt_dur "$dt"), total $(fmt_dur $((SECONDS - t0)))"
}

# cri-dockerd: the CRI shim in front of Docker that RKE and RKE1-style clusters use, so pods
# are plain containers of the node's dockerd (the node agent's Docker sees them). Built from
# its Go module; its go.mod pins k8s.io/* with `replace` directives, which Go ignores in a
# dependency, so the throwaway module copies them (they are all module@version, no paths).
cri_dockerd_version() { local v; v="$("$CRI_DOCKERD" --version 2>&1 || true)"; echo "${v%%$'\n'*}"; }
cri_dockerd_ok() {
    [[ -x "$CRI_DOCKERD" ]] && [[ "$(cri_dockerd_version)" == "cri-dockerd ${CRI_DOCKERD_VERSION#v} "* ]]
}
build_cri_dockerd() {
    step "cri-dockerd $CRI_DOCKERD_VERSION -> $CRI_DOCKERD"
    if cri_dockerd_ok; then
        ok "cached: $(cri_dockerd_version) (skip build)"
        return 0
    fi
    need_cmd go jq
    local t0=$SECONDS m="github.com/Mirantis/cri-dockerd"
    mkdir -p "$CRI_DOCKERD_DIR/bin"
    cd "$CRI_DOCKERD_DIR"
    local info cmod commit goline
    info="$(GOFLAGS='' timeout 1800 go mod download -json "$m@$CRI_DOCKERD_VERSION")"
    cmod="$(jq -r .GoMod <<<"$info")"
    [[ -s "$cmod" ]] || die "could not download $m@$CRI_DOCKERD_VERSION: $(jq -r .Error <<<"$info")"
    commit="$(jq -r '.Origin.Hash // "unknown"' "$(jq -r .Info <<<"$info")")"
    goline="$(grep -m1 -E '^go [0-9]' "$cmod")"
    info "cri-dockerd go.mod: $goline, commit ${commit:0:12}; copying its replace block"
    {
        echo "// Generated by tests/e2e/lib/build-k8s.sh: throwaway module to build cri-dockerd."
        echo "module tpe2e.local/cri-dockerd-build"
        echo
        echo "$goline"
        echo
        echo "require $m $CRI_DOCKERD_VERSION"
        echo
        # the `replace (` ... `)` block verbatim
        sed -n '/^replace (/,/^)/p' "$cmod"
    } >go.mod.new
    if ! cmp -s go.mod.new go.mod.gen 2>/dev/null || [[ ! -s go.mod ]]; then
        cp go.mod.new go.mod
        mv go.mod.new go.mod.gen
        rm -f go.sum
    else
        rm -f go.mod.new
    fi
    info "resolving dependencies"
    local t1=$SECONDS
    heavy timeout 1800 go get "$m@$CRI_DOCKERD_VERSION"
    info "dependencies resolved in $(fmt_dur $((SECONDS - t1)))"
    local pkg="$m/cmd/version"
    local ldflags="-s -w -X $pkg.Version=${CRI_DOCKERD_VERSION#v} -X $pkg.GitCommit=${commit:0:7}"
    info "go build -p $E2E_BUILD_P (nice -n 19 ionice -c3)"
    t1=$SECONDS
    heavy timeout 3600 go build -p "$E2E_BUILD_P" -trimpath -ldflags "$ldflags" -o "$CRI_DOCKERD.tmp" "$m"
    mv "$CRI_DOCKERD.tmp" "$CRI_DOCKERD"
    local dt=$((SECONDS - t1))
    cri_dockerd_ok || die "built cri-dockerd does not report $CRI_DOCKERD_VERSION: $(cri_dockerd_version)"
    echo "$(date -u +%FT%TZ) cri-dockerd $CRI_DOCKERD_VERSION go-build=${dt}s total=$((SECONDS - t0))s $(go version)" >>"$E2E_CACHE/build-times.log"
    ok "$(cri_dockerd_version) built: go build $(fmt_dur "$dt"), total $(fmt_dur $((SECONDS - t0)))"
}

what="${1:-all}"
case "$what" in
    paths)
        echo "K8S_VERSION=$K8S_VERSION"
        echo "KUBE_APISERVER=$KUBE_APISERVER"
        echo "KUBECTL=$KUBECTL"
        echo "ETCD=$ETCD"
        for c in "${CLUSTER_CMDS[@]}"; do v="${c^^}"; echo "${v//-/_}=$K8S_DIR/bin/$c"; done
        echo "CRI_DOCKERD=$CRI_DOCKERD"
        exit 0 ;;
    clean)
        step "removing $K8S_DIR, $ETCD_DIR and $CRI_DOCKERD_DIR"
        rm -rf "$K8S_DIR" "$ETCD_DIR" "$CRI_DOCKERD_DIR"
        ok "clean"
        exit 0 ;;
    all|kube-apiserver|kubectl|etcd|cluster|cri-dockerd) ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    *) die "unknown target '$what'" ;;
esac

mkdir -p "$E2E_CACHE"
# One heavy build at a time on this machine, whoever runs it.
exec 9>"$E2E_CACHE/.build.lock"
if ! flock -n 9; then
    info "another build-k8s.sh holds $E2E_CACHE/.build.lock; waiting (at most 2 h)"
    flock -w 7200 9 || die "gave up waiting for the build lock"
fi

T0=$SECONDS
case "$what" in
    all) build_etcd; build_k8s_cmd kube-apiserver; build_k8s_cmd kubectl
         build_k8s_cmds "${CLUSTER_CMDS[@]}"; build_cri_dockerd ;;
    kube-apiserver) build_k8s_cmd kube-apiserver ;;
    cluster) build_k8s_cmds "${CLUSTER_CMDS[@]}" ;;
    cri-dockerd) build_cri_dockerd ;;
    kubectl) build_k8s_cmd kubectl ;;
    etcd) build_etcd ;;
esac
step "done in $(fmt_dur $((SECONDS - T0)))"
if kube_apiserver_ok; then info "KUBE_APISERVER=$KUBE_APISERVER ($("$KUBE_APISERVER" --version))"; fi
if kubectl_ok; then info "KUBECTL=$KUBECTL (kubectl $(kubectl_version))"; fi
if etcd_ok; then info "ETCD=$ETCD ($(etcd_version))"; fi
for c in "${CLUSTER_CMDS[@]}"; do if k8s_cmd_ok "$c"; then info "$c: $K8S_DIR/bin/$c ($(k8s_cmd_version "$c"))"; fi; done
if cri_dockerd_ok; then info "CRI_DOCKERD=$CRI_DOCKERD ($(cri_dockerd_version))"; fi
