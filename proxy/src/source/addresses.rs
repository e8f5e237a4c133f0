//! This node's interface addresses. SIGNATURES ONLY: bodies on the `sources` branch.
use tokio::sync::mpsc;

use super::SourceEvent;

/// Send `LocalAddresses` now and whenever the set changes, until the receiver is dropped.
pub async fn run(tx: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
    let _ = tx;
    todo!("sources branch")
}
