//! A directory of manifests as a source. SIGNATURES ONLY: bodies on the `sources` branch.
use std::path::PathBuf;

use tokio::sync::mpsc;

use super::SourceEvent;

/// Read every manifest in `dir`, send its objects, then `Synced`, then follow changes until
/// the receiver is dropped.
pub async fn run(dir: PathBuf, tx: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
    let _ = (dir, tx);
    todo!("sources branch")
}
