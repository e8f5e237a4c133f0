use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::service_health::Wanted;
use super::*;
use crate::model::{
    Endpoint, IpFamily, LocalDetector, NodeNetwork, NodePortIps, Protocol, ServiceKey, ServicePort,
    ServicePortName, ServicePortState, Snapshot,
};

/// Minimal HTTP/1.1 GET: (status, lower-cased header lines, body).
pub(crate) async fn get(
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, Vec<String>, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timeout"))??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("read timeout"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((
        status,
        lines.map(|l| l.to_ascii_lowercase()).collect(),
        body.to_string(),
    ))
}

async fn serve_on_ephemeral(app: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (addr, task)
}

#[tokio::test]
async fn healthz_and_livez() {
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
    let metrics = Arc::new(Metrics::new());
    let (addr, task) = serve_on_ephemeral(healthz_router(health.clone(), metrics.clone())).await;

    let (code, headers, body) = get(addr, "/healthz").await.unwrap();
    assert_eq!(code, 503, "no sync yet: {body}");
    assert!(headers.contains(&"content-type: application/json".to_string()));
    assert!(headers.contains(&"x-content-type-options: nosniff".to_string()));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["lastUpdated"], "0001-01-01 00:00:00 +0000 UTC");
    assert_eq!(v["nodeEligible"], true);

    health.updated();
    let (code, _, body) = get(addr, "/healthz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["lastUpdated"], v["currentTime"]);

    // An ineligible node fails /healthz but not /livez.
    health.node_deleted();
    assert_eq!(get(addr, "/healthz").await.unwrap().0, 503);
    let (code, _, body) = get(addr, "/livez").await.unwrap();
    assert_eq!(code, 200);
    assert!(!body.contains("nodeEligible"));

    let text = metrics.encode();
    assert!(
        text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_proxy_livez_total{code=\"200\"} 1"),
        "{text}"
    );
    task.abort();
}

#[tokio::test]
async fn metrics_endpoint() {
    let metrics = Arc::new(Metrics::new());
    metrics.service_changes_total.inc();
    let (addr, task) = serve_on_ephemeral(metrics_router(metrics, "nftables")).await;
    let (code, headers, body) = get(addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        headers
            .iter()
            .any(|h| h.starts_with("content-type: application/openmetrics-text"))
    );
    assert!(
        body.contains("kubeproxy_sync_proxy_rules_service_changes_total 1"),
        "{body}"
    );
    let (code, _, body) = get(addr, "/proxyMode").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "nftables"));
    assert_eq!(get(addr, "/nope").await.unwrap().0, 404);
    task.abort();
}

fn key(name: &str) -> ServiceKey {
    ServiceKey {
        namespace: "ns".into(),
        name: name.into(),
    }
}

fn endpoint(ip: &str, local: bool, ready: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port: 80,
        ready,
        serving: ready,
        terminating: !ready,
        is_local: local,
        node_name: None,
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
    }
}

fn port_state(
    svc: &str,
    port_name: &str,
    hc_port: Option<u16>,
    etp_local: bool,
    endpoints: Vec<Endpoint>,
) -> (ServicePortName, ServicePortState) {
    let name = ServicePortName {
        service: key(svc),
        port: port_name.into(),
        protocol: Protocol::Tcp,
    };
    let local: Vec<Endpoint> = endpoints.iter().filter(|e| e.is_local).cloned().collect();
    let state = ServicePortState {
        port: ServicePort {
            name: name.clone(),
            family: IpFamily::V4,
            cluster_ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            node_port: Some(30080),
            external_ips: vec![],
            load_balancer_ips: vec!["192.0.2.1".parse().unwrap()],
            load_balancer_source_ranges: vec![],
            affinity_timeout_seconds: None,
            external_policy_local: etp_local,
            internal_policy_local: false,
            health_check_node_port: hc_port,
            traffic_distribution: None,
        },
        has_any_endpoints: !endpoints.is_empty(),
        cluster_endpoints: endpoints.clone(),
        local_endpoints: local,
        endpoints,
    };
    (name, state)
}

fn snapshot(
    node_port_ips: NodePortIps,
    services: Vec<(ServicePortName, ServicePortState)>,
) -> Snapshot {
    Snapshot {
        network: NodeNetwork {
            family: IpFamily::V4,
            node_name: "node".into(),
            primary_ip: None,
            node_port_ips,
            local_detector: LocalDetector::None,
            masquerade_all: false,
            service_cidrs: vec![],
        },
        services: services.into_iter().collect(),
    }
}

#[test]
fn wanted_counts_local_ready_endpoints_of_all_ports() {
    let snap = snapshot(
        NodePortIps::Addresses(vec!["127.0.0.1".parse().unwrap()]),
        vec![
            port_state(
                "lb",
                "http",
                Some(32000),
                true,
                vec![
                    endpoint("10.0.0.1", true, true),
                    endpoint("10.0.0.2", true, false),
                    endpoint("10.0.0.3", false, true),
                ],
            ),
            port_state(
                "lb",
                "https",
                Some(32000),
                true,
                vec![endpoint("10.0.0.1", true, true)],
            ),
            port_state(
                "cluster",
                "",
                Some(32001),
                false,
                vec![endpoint("10.0.0.9", true, true)],
            ),
            port_state("nohc", "", None, true, vec![]),
        ],
    );
    let w = Wanted::from_snapshots(&[snap]);
    assert_eq!(w.services, BTreeMap::from([(key("lb"), 32000)]));
    assert_eq!(w.endpoints, BTreeMap::from([(key("lb"), 2)]));
    assert_eq!(w.addrs, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);

    let w = Wanted::from_snapshots(&[snapshot(NodePortIps::AllLocal, vec![])]);
    assert_eq!(w.addrs, vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn health_check_node_port_servers() {
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
    health.updated();
    let mut server = ServiceHealthServer::new(health.clone());
    let port = free_port();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let addr = SocketAddr::new(lo, port);
    let mut wanted = Wanted {
        services: BTreeMap::from([(key("lb"), port)]),
        endpoints: BTreeMap::from([(key("lb"), 2)]),
        addrs: vec![lo],
    };
    server.sync(&wanted);
    assert_eq!(server.bound(&key("lb")), Some(&[addr][..]));

    let (code, headers, body) = get(addr, "/anything").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(headers.contains(&"x-load-balancing-endpoint-weight: 2".to_string()));
    assert!(headers.contains(&"x-content-type-options: nosniff".to_string()));
    assert!(headers.contains(&"content-type: application/json".to_string()));
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"lb\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );

    // No local endpoints: 503 with the count.
    wanted.endpoints.clear();
    server.sync(&wanted);
    let (code, headers, body) = get(addr, "/").await.unwrap();
    assert_eq!(code, 503);
    assert!(headers.contains(&"x-load-balancing-endpoint-weight: 0".to_string()));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 0);

    // Proxy unhealthy (a change pending past the timeout): 503 even with endpoints.
    let stale = Arc::new(ProxyHealth::new(Duration::ZERO));
    stale.updated();
    stale.queued_update();
    let mut server2 = ServiceHealthServer::new(stale);
    let port2 = free_port();
    server2.sync(&Wanted {
        services: BTreeMap::from([(key("x"), port2)]),
        endpoints: BTreeMap::from([(key("x"), 1)]),
        addrs: vec![lo],
    });
    let (code, _, body) = get(SocketAddr::new(lo, port2), "/").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("\"serviceProxyHealthy\": false"), "{body}");

    // The Service goes away: the port is closed.
    server.sync(&Wanted {
        addrs: vec![lo],
        ..Default::default()
    });
    assert_eq!(server.bound(&key("lb")), None);
    let mut closed = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "port {port} still open after the Service went away");
}

#[tokio::test]
async fn health_check_port_in_use_is_reported_and_retried() {
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
    health.updated();
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = blocker.local_addr().unwrap().port();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let wanted = Wanted {
        services: BTreeMap::from([(key("lb"), port)]),
        endpoints: BTreeMap::from([(key("lb"), 1)]),
        addrs: vec![lo],
    };
    let mut server = ServiceHealthServer::new(health);
    server.sync(&wanted);
    assert_eq!(server.bound(&key("lb")), None);
    drop(blocker);
    server.sync(&wanted);
    assert!(server.bound(&key("lb")).is_some());
    assert_eq!(get(SocketAddr::new(lo, port), "/").await.unwrap().0, 200);
}
