//! PURE: when to make iptables-nft build its cache from the whole table.
//!
//! Why: with `--noflush`, iptables-nft 1.8.9 builds its cache of the table from the chain
//! names the restore input mentions: each command adds its chain names to a sorted linked
//! list (`nft_cache_level_set()` -> `cache_chain_list_insert()` in iptables/nft-cache.c, a
//! walk from the list's head with `strcmp`), and at COMMIT `fetch_chain_cache()` asks the
//! kernel for each listed chain with its own `NFT_MSG_GETCHAIN`. The walk makes a block
//! quadratic in the chains it names ([`ChainMentions`]). Measured with
//! `iptables-nft-restore --noflush -w` on full restores rendered by this plan (N ClusterIP
//! Services × 10 endpoints, fresh netns, 2-core machine shared with other builds):
//!
//! | N | legacy | nft | nft with the whole-table request |
//! |---|---|---|---|
//! | 500 | 0.17 s | 1.8 s | |
//! | 1,000 | 0.41 s | 7.3 s | |
//! | 2,000 | 0.65 s | 35 s | 2.2 s |
//! | 4,000 | 2.8 s | (≥ 50 s) | 5.7 s |
//! | 10,000 | 14 s | > 7 min | 22 s |
//!
//! (exponent ~2.2 without the request; perf at 1,000 Services: 56% `__strcmp_avx2` and 27%
//! the list walk itself, at the instruction right after `cache_chain_list_insert`'s
//! `strcmp` call.)
//!
//! The way around it is in the same function: `if (!cmd->chain) { req->all_chains = true;
//! return; }`, and once `all_chains` is set, every later call returns before touching the
//! list; `__nft_build_cache()` then fetches the table's chains with one `NLM_F_DUMP`. The
//! only chainless commands that change nothing are the listings (`-L`, `-S`), which raise
//! the cache level to `NFT_CL_RULES` (`nft_cmd_rule_list_save()` in iptables/nft-cmd.c): the
//! table's rules are fetched and printed too. So a chainless `-S` first in a table block
//! costs a listing of what the table holds *before* the transaction (nothing on a cold
//! start, about an `iptables-nft-save` of the table when it is full) and removes the
//! quadratic walk. The request is read-only: the resulting ruleset is identical (compared
//! with `iptables-nft-save`). The cache request is reset at each COMMIT
//! (`nft_release_cache()`), so every table block needs its own.
//!
//! Whether it pays: a full restore names every chain, so it always does (0 existing rules on
//! a cold start; otherwise the walk is ~`mentions·names/2` ≈ 2·10^10 steps at 10,000
//! Services against one listing). A partial restore names the dispatch chain's targets (one
//! chain per Service port) plus the changed Services' chains: at 10,000 Services one
//! endpoint change took 1.5–2.0 s without the request and 6.1–7.4 s with it (the listing of
//! ~230,000 rules dominates), while a partial restore of thousands of changed Services
//! would be quadratic again. [`want_whole_table_cache`] compares the two estimates.
use super::render::ChainMentions;

/// The line inserted first in a table block: a chainless `-S` (list the table's rules).
pub const WHOLE_TABLE_REQUEST: &str = "-S\n";

/// List-walk steps that cost about as much as fetching and printing one existing rule with
/// the whole-table request. From the measurements above: a step (a `strcmp` on names that
/// share their 10-character `SHUNT-SEP-` prefix, plus a cache miss on the next list node)
/// ~15 ns; the request at 10,000 Services (~230,000 rules in the table) cost ~5 s more than
/// the per-name list, ~20 µs per rule.
pub const STEPS_PER_LISTED_RULE: u64 = 1_500;

/// True if iptables-nft should build its cache of a table from one dump of it (see the
/// module comment): when the sorted-list walk of the block's chain names, about
/// `mentions * names / 2` steps, would cost more than listing the `table_rules` rules the
/// table holds before the restore.
pub fn want_whole_table_cache(m: ChainMentions, table_rules: u64) -> bool {
    let walk = (m.mentions as u64).saturating_mul(m.names as u64) / 2;
    walk > STEPS_PER_LISTED_RULE.saturating_mul(table_rules)
}
