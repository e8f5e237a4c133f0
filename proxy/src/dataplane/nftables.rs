//! nftables backend: applies `plan::nft` transactions with `nft -j -f -` and reads state back.
//!
//! SIGNATURES ONLY: bodies are written on the `nft` branch.
use super::{Dataplane, DataplaneError, SyncOutcome, SyncRequest};

pub struct NftablesDataplane {}

impl NftablesDataplane {
    /// Checks that nft is usable; touches nothing.
    pub fn new() -> Result<Self, DataplaneError> {
        todo!("nft branch")
    }
}

impl Dataplane for NftablesDataplane {
    fn mode(&self) -> &'static str {
        "nftables"
    }
    fn sync(&mut self, request: SyncRequest<'_>) -> Result<SyncOutcome, DataplaneError> {
        let _ = request;
        todo!("nft branch")
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        todo!("nft branch")
    }
}
