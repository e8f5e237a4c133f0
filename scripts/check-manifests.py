#!/usr/bin/env python3
"""Checks on the rendered manifests that the Kubernetes schemas cannot make.

Usage: check-manifests.py MANIFESTS_DIR RENDERED.yaml...   (rendered files are named after
their kustomization: overlays-nftables.yaml, rollback-ebpf.yaml, cleanup-kube-proxy.yaml)

* the KubeProxyConfiguration in the shunt-config ConfigMap: known v1alpha1 fields only, the
  overlay's mode, and the same mode as the --proxy-mode flag (kube-proxy ignores flags other
  than --hostname-override when --config is given, so a disagreement would be silent);
* the overlays' config files are the base's with only the mode changed;
* probes on the healthz port of the config, /livez and /healthz;
* one image per render; read-only RBAC on exactly the watched resources;
* the DaemonSet's node-agent settings and least privilege (only ebpf's mount-bpffs init
  container is privileged);
* rollback renders run `--cleanup` and never select the running DaemonSet's pods.
"""
import os
import re
import sys

import yaml

MODES = ("nftables", "iptables", "ebpf")

# kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration (k8s.io/kube-proxy/config/v1alpha1).
KNOWN = {
    None: {"apiVersion", "kind", "featureGates", "clientConnection", "logging",
           "hostnameOverride", "bindAddress", "healthzBindAddress", "metricsBindAddress",
           "bindAddressHardFail", "enableProfiling", "showHiddenMetricsForVersion", "mode",
           "iptables", "ipvs", "nftables", "winkernel", "detectLocalMode", "detectLocal",
           "clusterCIDR", "nodePortAddresses", "oomScoreAdj", "conntrack", "configSyncPeriod",
           "portRange", "windowsRunAsService", "linux"},
    "clientConnection": {"kubeconfig", "acceptContentTypes", "contentType", "qps", "burst"},
    "iptables": {"masqueradeAll", "masqueradeBit", "localhostNodePorts", "syncPeriod",
                 "minSyncPeriod"},
    "nftables": {"masqueradeAll", "masqueradeBit", "syncPeriod", "minSyncPeriod"},
    "conntrack": {"maxPerCore", "min", "tcpEstablishedTimeout", "tcpCloseWaitTimeout",
                  "tcpBeLiberal", "udpTimeout", "udpStreamTimeout"},
}

errors = []


def check(cond, msg):
    if not cond:
        errors.append(msg)


def containers(ds, init=False):
    spec = ds["spec"]["template"]["spec"]
    return spec.get("initContainers" if init else "containers") or []


def check_config(where, text, want_mode):
    conf = yaml.safe_load(text)
    check(conf.get("apiVersion") == "kubeproxy.config.k8s.io/v1alpha1",
          f"{where}: config.conf apiVersion")
    check(conf.get("kind") == "KubeProxyConfiguration", f"{where}: config.conf kind")
    for section, keys in KNOWN.items():
        obj = conf if section is None else (conf.get(section) or {})
        unknown = set(obj) - keys
        check(not unknown, f"{where}: config.conf {section or 'top level'}: unknown fields "
                           f"{sorted(unknown)}")
    check(conf.get("mode") == want_mode,
          f"{where}: config.conf mode {conf.get('mode')!r}, want {want_mode!r}")
    return conf


def check_render(name, docs):
    kind = name.split("-")[0]
    objs = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    images = {c["image"] for d in docs if d["kind"] == "DaemonSet"
              for c in containers(d) + containers(d, init=True)}
    check(len(images) == 1, f"{name}: containers use different images: {sorted(images)}")
    check(not any(":" not in i.rsplit("/", 1)[-1] for i in images),
          f"{name}: untagged image in {sorted(images)}")

    for d in docs:
        if d["kind"] == "DaemonSet":
            spec = d["spec"]["template"]["spec"]
            check(d["metadata"].get("namespace") == "kube-system", f"{name}: namespace")
            check(spec.get("hostNetwork") is True, f"{name}: hostNetwork")
            check(spec.get("priorityClassName") == "system-node-critical", f"{name}: priority")
            check(spec.get("tolerations") == [{"operator": "Exists"}],
                  f"{name}: must tolerate every taint")
            check(d["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                                  "rollingUpdate": {"maxUnavailable": "10%"}},
                  f"{name}: updateStrategy")
            for c in containers(d) + containers(d, init=True):
                sc = c.get("securityContext") or {}
                if sc.get("privileged"):
                    check(c["name"] == "mount-bpffs",
                          f"{name}: container {c['name']} is privileged")
                else:
                    check(sc.get("capabilities", {}).get("drop") == ["ALL"],
                          f"{name}: container {c['name']} must drop ALL capabilities")
                check("requests" in (c.get("resources") or {}),
                      f"{name}: container {c['name']} has no resource requests")
        if d["kind"] == "ClusterRole":
            for rule in d["rules"]:
                check(set(rule["verbs"]) <= {"get", "list", "watch"},
                      f"{name}: ClusterRole {d['metadata']['name']} verbs {rule['verbs']}")
            granted = {(g, r) for rule in d["rules"] for g in rule["apiGroups"]
                       for r in rule["resources"]}
            check(granted == {("", "services"), ("", "nodes"),
                              ("discovery.k8s.io", "endpointslices"),
                              ("networking.k8s.io", "servicecidrs")},
                  f"{name}: ClusterRole grants {sorted(granted)}")

    if kind == "cleanup":
        ds = objs[("DaemonSet", "shunt-cleanup-kube-proxy")]
        check(containers(ds, init=True)[0]["args"] == ["--cleanup-kube-proxy"],
              f"{name}: init container must run --cleanup-kube-proxy")
        return

    mode = name.split("-", 1)[1]
    suffix = "-rollback" if kind == "rollback" else ""
    ds = objs[("DaemonSet", "shunt" + suffix)]
    cms = [d for d in docs if d["kind"] == "ConfigMap"
           and d["metadata"]["name"].startswith("shunt-config" + suffix)]
    check(len(cms) == 1, f"{name}: want one shunt-config ConfigMap, have {len(cms)}")
    conf = check_config(name, cms[0]["data"]["config.conf"], mode)
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    check(vols["config"]["configMap"]["name"] == cms[0]["metadata"]["name"],
          f"{name}: the config volume does not mount the generated ConfigMap")
    shunt = next(c for c in containers(ds) if c["name"] == "shunt")

    if kind == "overlays":
        args = shunt["args"]
        check("--config=/var/lib/shunt/config.conf" in args, f"{name}: --config")
        check(f"--proxy-mode={mode}" in args, f"{name}: --proxy-mode={mode} missing: {args}")
        check("--hostname-override=$(NODE_NAME)" in args, f"{name}: --hostname-override")
        env = {e["name"]: e for e in shunt.get("env", [])}
        check(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {})
              .get("fieldPath") == "spec.nodeName", f"{name}: NODE_NAME from spec.nodeName")
        port = int(conf["healthzBindAddress"].rsplit(":", 1)[1])
        check(port == 10256, f"{name}: healthz port {port}")
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/healthz")):
            got = shunt.get(probe, {}).get("httpGet", {})
            check(got.get("path") == path and got.get("port") == port,
                  f"{name}: {probe} {got}, want {path} on {port}")
        caps = set(shunt["securityContext"]["capabilities"]["add"])
        want = {"nftables": {"NET_ADMIN", "SYS_RESOURCE"},
                "iptables": {"NET_ADMIN", "NET_RAW", "SYS_RESOURCE"},
                "ebpf": {"NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"}}[mode]
        check(caps == want, f"{name}: capabilities {sorted(caps)}, want {sorted(want)}")
        mounts = {m["mountPath"]: m for m in shunt.get("volumeMounts", [])}
        if mode == "iptables":
            check("/run/xtables.lock" in mounts and mounts.get("/lib/modules", {})
                  .get("readOnly"), f"{name}: iptables mounts")
        if mode == "ebpf":
            check("/sys/fs/bpf" in mounts and "/run/shunt/cgroupv2" in mounts,
                  f"{name}: ebpf mounts")
            init = {c["name"]: c for c in containers(ds, init=True)}
            bpf = [m for m in init["mount-bpffs"]["volumeMounts"]
                   if m["mountPath"] == "/sys/fs/bpf"]
            check(bpf and bpf[0].get("mountPropagation") == "Bidirectional",
                  f"{name}: mount-bpffs must propagate the bpffs mount to the host")
    else:
        init = containers(ds, init=True)[0]
        check(init["name"] == "cleanup-shunt" and "--cleanup" in init["args"],
              f"{name}: first init container must run --cleanup")
        check(ds["spec"]["selector"]["matchLabels"]["k8s-app"] != "shunt",
              f"{name}: must not select the shunt DaemonSet's pods")
        check("livenessProbe" not in shunt and "readinessProbe" not in shunt,
              f"{name}: the waiting container has probes")


def main():
    manifests, rendered = sys.argv[1], sys.argv[2:]
    base = open(os.path.join(manifests, "base/config.conf")).read()
    check(re.search(r"^mode: nftables$", base, re.M), "base/config.conf: mode nftables")
    for mode in ("iptables", "ebpf"):
        text = open(os.path.join(manifests, f"overlays/{mode}/config.conf")).read()
        want = base.replace("mode: nftables\n", f"mode: {mode}\n").replace(
            "for shunt in nftables mode", f"for shunt in {mode} mode")
        check(text == want, f"overlays/{mode}/config.conf differs from base/config.conf "
                            "in more than the mode")
    for path in rendered:
        name = os.path.basename(path)[:-len(".yaml")]
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        check_render(name, docs)
    for e in errors:
        print(f"check-manifests: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"check-manifests: {len(rendered)} renders consistent")


if __name__ == "__main__":
    main()
