//! The Kubernetes API as a source. SIGNATURES ONLY: bodies on the `sources` branch.
use tokio::sync::mpsc;

use super::SourceEvent;

/// Watch Services, EndpointSlices (kube-proxy's label selector), ServiceCIDRs and this node's
/// Node object; send `Synced` once every initial list is complete; follow until the receiver
/// is dropped.
pub async fn run(
    client: ::kube::Client,
    node_name: String,
    tx: mpsc::Sender<SourceEvent>,
) -> anyhow::Result<()> {
    let _ = (client, node_name, tx);
    todo!("sources branch")
}
