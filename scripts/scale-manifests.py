#!/usr/bin/env python3
"""Writes a manifest directory for scale measurements: N ClusterIP Services, each with one
EndpointSlice of E ready endpoints, plus the ServiceCIDR `kubernetes` and the Node object.

Usage: scale-manifests.py DIR [--services N] [--endpoints E] [--node NAME] [--node-ip IP]
Services land in 172.30.0.0/16 (up to 65,000), endpoints in 10.128.0.0/9 (all remote).
One file per 1,000 Services keeps single-file rewrites (one endpoint change) cheap to read.
"""
import argparse
import ipaddress
import json
import os

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--services", type=int, default=10000)
p.add_argument("--endpoints", type=int, default=10)
p.add_argument("--node", default="scale-node")
p.add_argument("--node-ip", default="192.168.0.2")
a = p.parse_args()
os.makedirs(a.dir, exist_ok=True)

svc_base = int(ipaddress.ip_address("172.30.0.0"))
ep_base = int(ipaddress.ip_address("10.128.0.0"))


def service(i):
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": f"svc{i}", "namespace": "scale"},
        "spec": {"type": "ClusterIP", "clusterIP": str(ipaddress.ip_address(svc_base + 10 + i)),
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]},
    }


def slice_(i, extra=0):
    eps = [{"addresses": [str(ipaddress.ip_address(ep_base + i * 16 + j))],
            "conditions": {"ready": True}, "nodeName": "other-node"}
           for j in range(a.endpoints + extra)]
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"svc{i}-1", "namespace": "scale",
                     "labels": {"kubernetes.io/service-name": f"svc{i}"}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


for chunk in range(0, a.services, 1000):
    items = []
    for i in range(chunk, min(chunk + 1000, a.services)):
        items += [service(i), slice_(i)]
    with open(os.path.join(a.dir, f"services-{chunk // 1000:03d}.json"), "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)

with open(os.path.join(a.dir, "cluster.json"), "w") as f:
    json.dump({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
         "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["172.30.0.0/16"]}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": a.node},
         "status": {"addresses": [{"type": "InternalIP", "address": a.node_ip}]}},
    ]}, f)
