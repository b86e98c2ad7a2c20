//! Output lengths over the wire: a store's `output_tokens` reaches the
//! server's `odds` policy, which learns from it which prompts come back.

use bytes::Bytes;
use cache_server::client::{Client, SharedTier};
use radixkv_tests::*;

/// How a run stores each request's blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Store {
    /// `Store` without an output length.
    Blind,
    /// `Store` with the request's output length.
    WithOutput,
    /// Shared-memory slots committed with the output length.
    ShmWithOutput,
    /// `Store` without an output length, then a `Store` of no blocks with
    /// it, as an engine does that stores while it prefills.
    OutputAfter,
}

const PAGES: usize = 2;
/// Requests between a returning prompt's two uses: 400 pages pass in
/// between, more than the server's 64 host and 256 disk blocks hold.
const RETURN_AFTER: u32 = 200;
const REQUESTS: u32 = 1000;

/// The share of returning prompts' pages that hit in the second half of a
/// stream where every fourth request is a short answer asked again
/// `RETURN_AFTER` requests later, and the rest are one-offs with long
/// answers.
async fn returns_caught(store: Store) -> f64 {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "policy = \"odds\"");
    let client = server.unix_client(None).await;
    let scope = Scope::model("m");
    let shm = SharedTier::open(&client.info(&scope).await.unwrap()).unwrap();
    let (mut hit, mut returning) = (0, 0);
    for t in 0..REQUESTS {
        let (id, output) = match t % 4 {
            0 => (t, 5),
            1 if t > RETURN_AFTER => (t - 1 - RETURN_AFTER, 5),
            _ => (t, 500),
        };
        let tokens = prompt(id, PAGES);
        let found = client.lookup(&scope, &tokens, None, false).await.unwrap();
        if t % 4 == 1 && t > RETURN_AFTER && t >= REQUESTS / 2 {
            returning += PAGES;
            hit += found.pages;
        }
        if found.pages < PAGES {
            let first = found.pages;
            stored(&client, &shm, &scope, &tokens, first, id, output, store).await;
        }
        if store == Store::OutputAfter {
            let out = client
                .store_with_output(&scope, &tokens, PAGES, Bytes::new(), BLOCK, output)
                .await
                .unwrap();
            assert_eq!((out.cached_pages, out.stored_pages), (PAGES, 0));
        }
    }
    hit as f64 / returning as f64
}

#[allow(clippy::too_many_arguments)]
async fn stored(
    client: &Client,
    shm: &SharedTier,
    scope: &Scope,
    tokens: &[u32],
    first: usize,
    id: u32,
    output: u32,
    store: Store,
) {
    let out = match store {
        Store::Blind | Store::OutputAfter => client
            .store(scope, tokens, first, blocks(id, first..PAGES), BLOCK)
            .await
            .unwrap(),
        Store::WithOutput => client
            .store_with_output(
                scope,
                tokens,
                first,
                blocks(id, first..PAGES),
                BLOCK,
                output,
            )
            .await
            .unwrap(),
        Store::ShmWithOutput => {
            let (reservation, offsets) = client.reserve_shm(PAGES - first, 10_000).await.unwrap();
            for (i, &off) in offsets.iter().enumerate() {
                shm.write(off, &block(id, first + i)).unwrap();
            }
            client
                .commit_shm_with_output(reservation, scope, tokens, first, output)
                .await
                .unwrap()
        }
    };
    assert_eq!(out.cached_pages + out.stored_pages, PAGES, "{store:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_lengths_let_odds_keep_the_prompts_that_return() {
    let (blind, told, told_shm, told_after) = tokio::join!(
        returns_caught(Store::Blind),
        returns_caught(Store::WithOutput),
        returns_caught(Store::ShmWithOutput),
        returns_caught(Store::OutputAfter),
    );
    eprintln!(
        "returns caught: blind {blind:.3}, told {told:.3}, told by shm {told_shm:.3}, \
         told after the store {told_after:.3}"
    );
    // Without output lengths every prompt looks alike, and a return comes
    // after more pages than the cache holds: recency keeps none of them.
    assert!(blind < 0.1, "blind {blind}");
    assert!(told > 0.5, "with output lengths {told}");
    assert!(
        told_shm > 0.5,
        "with output lengths, by shared memory {told_shm}"
    );
    assert!(
        told_after > 0.5,
        "with output lengths after the blocks {told_after}"
    );
}
