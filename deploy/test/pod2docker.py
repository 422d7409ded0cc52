#!/usr/bin/env python3
"""Turns one container of a Deployment/DaemonSet from a manifest into `docker run` arguments,
doing what the kubelet would do with it, so the tests run the images exactly as the manifests
describe them, without a kubelet:

* env: value, fieldRef (from --field), configMapKeyRef/secretKeyRef (from the manifests given);
  $(VAR) references in env values, command and args are expanded as Kubernetes does;
* securityContext (pod, then container): runAsUser/runAsGroup -> --user, runAsNonRoot checked
  (a pod with uid 0 and runAsNonRoot is refused, as the kubelet refuses it), fsGroup ->
  --group-add plus group ownership of secret, service-account and PVC volumes (the kubelet's
  rule: group r for read-only volumes, rw for others), readOnlyRootFilesystem -> --read-only,
  allowPrivilegeEscalation: false -> no-new-privileges, capabilities, privileged;
* resources.limits -> --memory/--cpus;
* volumes: secret (files written from the Secret in the manifests, with defaultMode), emptyDir
  (tmpfs), hostPath (--host-path maps the node path to a local directory), PVC (--pvc), and the
  automounted service-account token (--sa-dir);
* hostNetwork -> --network host (--network overrides, for pods that would have a pod network);
* probes are printed (resolved named ports), for the test to poll as the kubelet would.

Output: JSON {"args": [...], "probes": {"liveness": {...}, ...}, "user": "uid:gid"}.
Test-only overrides (--env, --set-arg) are explicit on the command line of the caller.
"""

import argparse
import base64
import json
import os
import re
import sys

import yaml

SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def die(msg):
    print(f"pod2docker: {msg}", file=sys.stderr)
    sys.exit(1)


def load(paths):
    objs = []
    for p in paths:
        with open(p) as f:
            objs.extend(o for o in yaml.safe_load_all(f) if o)
    return objs


def find(objs, kind, name, namespace=None):
    for o in objs:
        md = o.get("metadata", {})
        if o.get("kind") == kind and md.get("name") == name and (
            namespace is None or md.get("namespace", "default") == namespace
        ):
            return o
    return None


def quantity_bytes(q):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    if not m:
        die(f"memory quantity {q!r} not understood")
    mult = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(float(m.group(1)) * mult)


def quantity_cpus(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def expand(s, env):
    # Kubernetes: $(VAR) is replaced when VAR is defined, $$(VAR) escapes, else left as is.
    def rep(m):
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$?\(([A-Za-z_][A-Za-z0-9_]*)\)", rep, s)


def chown_tree(path, gid, readonly):
    """The kubelet's fsGroup ownership: group gid, + r (read-only) or rw, setgid dirs."""
    for root, dirs, files in os.walk(path):
        for p in [root] + [os.path.join(root, f) for f in files]:
            st = os.lstat(p)
            os.lchown(p, -1, gid)
            if os.path.islink(p):
                continue
            mask = 0o440 if readonly else 0o660
            if os.path.isdir(p):
                mask |= 0o2000 | 0o110
            os.chmod(p, (st.st_mode & 0o7777) | mask)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", action="append", required=True,
                    help="YAML file(s): the workload, and the ConfigMaps/Secrets it refers to")
    ap.add_argument("--kind", required=True, choices=["Deployment", "DaemonSet"])
    ap.add_argument("--name", required=True)
    ap.add_argument("--container", help="container name (default: the only one)")
    ap.add_argument("--docker-name", required=True, help="docker --name")
    ap.add_argument("--image", help="override the image")
    ap.add_argument("--field", action="append", default=[], metavar="PATH=VALUE",
                    help="value of a fieldRef (spec.nodeName, status.hostIP, ...)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="test override: set/replace an environment variable")
    ap.add_argument("--set-arg", action="append", default=[], metavar="--FLAG=VALUE",
                    help="test override: replace the argument that starts with --FLAG=")
    ap.add_argument("--host-path", action="append", default=[], metavar="NODEPATH=LOCALDIR")
    ap.add_argument("--pvc", action="append", default=[], metavar="CLAIM=LOCALDIR")
    ap.add_argument("--sa-dir", help="directory with token, ca.crt, namespace (automounted SA)")
    ap.add_argument("--volumes-dir", required=True, help="where secret volumes are written")
    ap.add_argument("--network", help="override: docker network (default: host if hostNetwork)")
    ap.add_argument("--port-remap", action="append", default=[], metavar="PORT=PORT",
                    help="test override: probes of PORT go to the other port (when the test moves a "
                         "listener to a free port because the container shares the host network)")
    a = ap.parse_args()

    objs = load(a.manifest)
    wl = find(objs, a.kind, a.name)
    if not wl:
        die(f"no {a.kind} {a.name} in {a.manifest}")
    ns = wl["metadata"].get("namespace", "default")
    pod = wl["spec"]["template"]["spec"]
    containers = pod["containers"]
    if a.container:
        c = next((c for c in containers if c["name"] == a.container), None)
    elif len(containers) == 1:
        c = containers[0]
    else:
        c = None
    if not c:
        die("container not found (give --container)")

    fields = dict(kv.split("=", 1) for kv in a.field)
    overrides = dict(kv.split("=", 1) for kv in a.env)
    args = ["run", "-d", "--name", a.docker_name,
            "--label", f"tunnel-deploy-test={a.kind}/{a.name}"]

    # --- security context
    psc = pod.get("securityContext", {}) or {}
    csc = c.get("securityContext", {}) or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
    if non_root and uid == 0:
        die("runAsNonRoot with runAsUser 0: the kubelet would refuse to start this container")
    if non_root and uid is None:
        die("runAsNonRoot without runAsUser: needs a numeric USER in the image; not emulated")
    user = None
    if uid is not None:
        user = f"{uid}:{gid if gid is not None else uid}"
        args += ["--user", user]
    fs_group = psc.get("fsGroup")
    groups = list(psc.get("supplementalGroups", []) or [])
    if fs_group is not None:
        groups.append(fs_group)
    for g in groups:
        args += ["--group-add", str(g)]
    if csc.get("privileged"):
        args.append("--privileged")
    if csc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if csc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    caps = csc.get("capabilities", {}) or {}
    for cap in caps.get("drop", []) or []:
        args += ["--cap-drop", cap]
    for cap in caps.get("add", []) or []:
        args += ["--cap-add", cap]

    # --- resources
    limits = (c.get("resources", {}) or {}).get("limits", {}) or {}
    if "memory" in limits:
        args += ["--memory", str(quantity_bytes(limits["memory"]))]
    if "cpu" in limits:
        args += ["--cpus", str(quantity_cpus(limits["cpu"]))]

    # --- network
    network = a.network or ("host" if pod.get("hostNetwork") else None)
    if not network:
        die("the pod has no hostNetwork; say which docker network stands in for the pod network (--network)")
    args += ["--network", network]

    # --- env
    env = {}
    for e in c.get("env", []) or []:
        name = e["name"]
        if "value" in e:
            env[name] = expand(str(e["value"]), env)
            continue
        vf = e.get("valueFrom", {})
        if "fieldRef" in vf:
            path = vf["fieldRef"]["fieldPath"]
            if path not in fields and name not in overrides:
                die(f"env {name}: fieldRef {path} needs --field {path}=VALUE")
            env[name] = fields.get(path, "")
        elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
            kind = "ConfigMap" if "configMapKeyRef" in vf else "Secret"
            ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
            src = find(objs, kind, ref["name"], ns)
            if src is None:
                if name in overrides:
                    continue
                die(f"env {name}: {kind} {ns}/{ref['name']} not in the manifests")
            if kind == "ConfigMap":
                env[name] = src.get("data", {})[ref["key"]]
            else:
                env[name] = base64.b64decode(src.get("data", {})[ref["key"]]).decode()
        else:
            die(f"env {name}: valueFrom {list(vf)} not emulated")
    env.update(overrides)
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]

    # --- volumes
    volumes = {v["name"]: v for v in pod.get("volumes", []) or []}
    host_paths = dict(kv.split("=", 1) for kv in a.host_path)
    pvcs = dict(kv.split("=", 1) for kv in a.pvc)
    for m in c.get("volumeMounts", []) or []:
        v = volumes.get(m["name"]) or die(f"volumeMount {m['name']} has no volume")
        target = m["mountPath"]
        ro = bool(m.get("readOnly"))
        if "secret" in v:
            sec = find(objs, "Secret", v["secret"]["secretName"], ns)
            if sec is None:
                die(f"Secret {ns}/{v['secret']['secretName']} not in the manifests")
            d = os.path.join(a.volumes_dir, f"{a.docker_name}-{m['name']}")
            os.makedirs(d, exist_ok=True)
            mode = v["secret"].get("defaultMode", 0o644)
            for key, b64 in (sec.get("data") or {}).items():
                p = os.path.join(d, key)
                with open(p, "wb") as f:
                    f.write(base64.b64decode(b64))
                os.chown(p, 0, 0)
                os.chmod(p, mode)
            os.chmod(d, 0o755)
            if fs_group is not None:
                chown_tree(d, fs_group, True)
            args += ["-v", f"{d}:{target}:ro"]  # secret volumes are always read-only
        elif "emptyDir" in v:
            ed = v["emptyDir"] or {}
            opts = ["rw", "mode=1777"]
            if ed.get("sizeLimit"):
                opts.append(f"size={quantity_bytes(ed['sizeLimit'])}")
            args += ["--tmpfs", f"{target}:{','.join(opts)}"]
        elif "hostPath" in v:
            node_path = v["hostPath"]["path"]
            local = host_paths.get(node_path) or die(f"hostPath {node_path} needs --host-path {node_path}=DIR")
            want = v["hostPath"].get("type", "")
            if want == "Directory" and not os.path.isdir(local):
                die(f"hostPath {node_path} (type Directory): {local} is not a directory")
            if want == "Socket" and not os.path.exists(local):
                die(f"hostPath {node_path} (type Socket): {local} missing")
            args += ["-v", f"{local}:{target}{':ro' if ro else ''}"]
        elif "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            local = pvcs.get(claim) or die(f"PVC {claim} needs --pvc {claim}=DIR")
            os.makedirs(local, exist_ok=True)
            if fs_group is not None:
                chown_tree(local, fs_group, False)
            args += ["-v", f"{local}:{target}{':ro' if ro else ''}"]
        else:
            die(f"volume {m['name']}: {sorted(set(v) - {'name'})} not emulated")

    if pod.get("automountServiceAccountToken", True) is not False:
        if not a.sa_dir:
            die("the pod automounts a service-account token: give --sa-dir")
        if fs_group is not None:
            chown_tree(a.sa_dir, fs_group, True)
        args += ["-v", f"{a.sa_dir}:{SA_PATH}:ro"]

    # --- command line
    cmd = [expand(x, env) for x in c.get("command", []) or []]
    cargs = [expand(x, env) for x in c.get("args", []) or []]
    for sa in a.set_arg:
        flag = sa.split("=", 1)[0] + "="
        hits = [i for i, x in enumerate(cargs) if x.startswith(flag)]
        if not hits:
            die(f"--set-arg {sa}: no argument starting with {flag} in {cargs}")
        for i in hits:
            cargs[i] = sa
    if cmd:
        args += ["--entrypoint", cmd[0]]
    args.append(a.image or c["image"])
    args += cmd[1:] + cargs

    # --- probes, with named ports resolved
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) or [] if "name" in p}
    remap = {int(k): int(v) for k, v in (kv.split("=", 1) for kv in a.port_remap)}
    probes = {}
    for kind in ("startup", "liveness", "readiness"):
        p = c.get(f"{kind}Probe")
        if not p:
            continue
        h = p.get("httpGet") or die(f"{kind} probe is not httpGet: not emulated")
        port = h["port"]
        port = ports.get(port, port) if isinstance(port, str) else port
        probes[kind] = {"scheme": h.get("scheme", "HTTP").lower(), "host": h.get("host", "127.0.0.1"),
                        "port": remap.get(int(port), int(port)), "path": h.get("path", "/"),
                        "periodSeconds": p.get("periodSeconds", 10),
                        "failureThreshold": p.get("failureThreshold", 3)}
    json.dump({"args": args, "probes": probes, "user": user, "env": env}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
