//! Peer comparison: replays a Mooncake trace through Dynamo's router index
//! (`dynamo-kv-router` =1.6.1, its single-threaded [`RadixTree`]).
//!
//! The replay copies the way Dynamo's own Mooncake benchmark
//! (`lib/kv-router/benches/mooncake_bench.rs` and `benches/common/mod.rs` in
//! ai-dynamo/dynamo) feeds the index. There is one worker (id 0, dp rank 0) and
//! no eviction:
//!
//! * **Local block hash** (`LocalBlockHash`, the key the tree walks on): the
//!   block's hash id, written out as `TOKENS_PER_BLOCK` copies of the id as a
//!   little-endian `u32` token and hashed with XXH3 seed 1337
//!   (`protocols::compute_block_hash`). This is the benchmark's
//!   `local_block_hash_from_id`, which is also what its mock engine puts in
//!   `tokens_hash`.
//! * **Sequence block hash** (`ExternalSequenceBlockHash`, the opaque id the
//!   tree keeps per block and looks parents up by): the chained hash from
//!   `protocols::compute_seq_hash_for_block`. `seq[0] = local[0]` and
//!   `seq[i] = xxh3([seq[i-1], local[i]], 1337)`. The engine (the mock engine
//!   in their benchmark, through `dynamo_tokens::TokenBlock`) reports this as
//!   `block_hash`.
//!
//! For each request: `find_matches(local hashes, early_exit = false)`, the way
//! Dynamo's `KvIndexer` actor calls it. Then, if any blocks are missing, one
//! `Stored` event for the blocks after the matched prefix, with `parent_hash` =
//! the sequence hash of the last matched block (`None` if nothing matched).
//!
//! Every input (hashes, lookup vectors, events) is built before the clock
//! starts. The API takes the lookup `Vec` and the event by value, so the
//! prepared values are moved in; nothing is cloned in the timed loop. The
//! timed loop still includes what the API itself costs: dropping the moved-in
//! vectors and the `OverlapScores` map returned by each lookup.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use anyhow::{bail, Context};
use dynamo_kv_router::protocols::{
    compute_block_hash, compute_seq_hash_for_block, ExternalSequenceBlockHash, KvCacheEvent,
    KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
    WorkerWithDpRank,
};
use dynamo_kv_router::RadixTree;

/// Result of replaying a trace through Dynamo's RadixTree, unbounded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerReplay {
    pub requests: usize,
    pub blocks: usize,
    pub hit_blocks: usize,
    pub seconds: f64,
}

/// The single worker all events come from and all lookups are scored for.
const WORKER_ID: u64 = 0;
const DP_RANK: u32 = 0;

/// Tokens per trace block (Mooncake's hash ids stand for 512-token blocks).
/// It only picks how many copies of the id get hashed into the local block hash.
/// Any fixed value produces the same tree shape.
const TOKENS_PER_BLOCK: usize = 512;

/// Dynamo's benchmark `local_block_hash_from_id`: the id repeated as `u32`
/// tokens, hashed with XXH3 (seed 1337). Their code truncates the id with
/// `as u32`. Ids that don't fit in a `u32` are hashed here as full `u64`s
/// instead, so two such ids can't alias.
fn local_block_hash_from_id(id: u64, buf: &mut Vec<u8>) -> LocalBlockHash {
    buf.clear();
    match u32::try_from(id) {
        Ok(token) => {
            for _ in 0..TOKENS_PER_BLOCK {
                buf.extend_from_slice(&token.to_le_bytes());
            }
        }
        Err(_) => {
            for _ in 0..TOKENS_PER_BLOCK / 2 {
                buf.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    compute_block_hash(buf)
}

/// One request's prepared inputs.
struct Prepared {
    /// The lookup: local block hashes of every block of the request.
    lookup: Vec<LocalBlockHash>,
    /// Blocks the unbounded index must already hold (the infinite-cache prefix hit).
    expected_hit: usize,
    /// The `Stored` event for the blocks after that prefix (`None` if there are none).
    event: Option<RouterEvent>,
}

/// Builds every request's lookup and event. The expected hit is the longest
/// prefix whose chained sequence hash an earlier request has stored. With one
/// unbounded worker, that prefix is exactly what the tree must return.
fn prepare(requests: &[Vec<u64>]) -> Vec<Prepared> {
    let mut local_of: HashMap<u64, LocalBlockHash> = HashMap::new();
    let mut buf = Vec::with_capacity(TOKENS_PER_BLOCK * 4);
    let mut stored: HashSet<u64> = HashSet::new();
    let mut prepared = Vec::with_capacity(requests.len());

    for (index, ids) in requests.iter().enumerate() {
        let lookup: Vec<LocalBlockHash> = ids
            .iter()
            .map(|&id| {
                *local_of
                    .entry(id)
                    .or_insert_with(|| local_block_hash_from_id(id, &mut buf))
            })
            .collect();
        let seq = compute_seq_hash_for_block(&lookup);
        let expected_hit = seq.iter().take_while(|h| stored.contains(h)).count();

        let event = (expected_hit < seq.len()).then(|| {
            let blocks = lookup[expected_hit..]
                .iter()
                .zip(&seq[expected_hit..])
                .map(|(&local, &seq_hash)| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(seq_hash),
                    tokens_hash: local,
                    mm_extra_info: None,
                })
                .collect();
            let parent_hash = expected_hit
                .checked_sub(1)
                .map(|last| ExternalSequenceBlockHash(seq[last]));
            RouterEvent::new(
                WORKER_ID,
                KvCacheEvent {
                    event_id: index as u64,
                    data: KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash,
                        start_position: None,
                        blocks,
                    }),
                    dp_rank: DP_RANK,
                },
            )
        });
        stored.extend(seq[expected_hit..].iter().copied());

        prepared.push(Prepared {
            lookup,
            expected_hit,
            event,
        });
    }
    prepared
}

/// Replays `requests` (each the hash_ids of one request) through dynamo-kv-router's RadixTree:
/// per request find_matches, then one Stored event for the missing blocks. Times only the replay loop
/// (building the inputs, e.g. the events' hashes, happens before the clock starts), on the calling thread.
pub fn replay_dynamo(requests: &[Vec<u64>]) -> anyhow::Result<PeerReplay> {
    let blocks = requests.iter().map(Vec::len).sum();
    let prepared = prepare(requests);
    let worker = WorkerWithDpRank::new(WORKER_ID, DP_RANK);
    let mut tree = RadixTree::new();
    let mut hit_blocks = 0usize;

    let start = Instant::now();
    for (index, request) in prepared.into_iter().enumerate() {
        let scores = tree.find_matches(request.lookup, false);
        let hit = scores.scores.get(&worker).map_or(0, |&s| s as usize);
        if hit != request.expected_hit {
            bail!(
                "dynamo RadixTree matched {hit} blocks of request {index}, \
                 the unbounded prefix index holds {}",
                request.expected_hit
            );
        }
        hit_blocks += hit;
        if let Some(event) = request.event {
            tree.apply_event(event).with_context(|| {
                format!("dynamo RadixTree rejected the store of request {index}")
            })?;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(tree);

    Ok(PeerReplay {
        requests: requests.len(),
        blocks,
        hit_blocks,
        seconds,
    })
}
