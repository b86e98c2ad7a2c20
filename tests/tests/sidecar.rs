//! The sidecar end to end: the real binary on loopback, the Rust client on
//! TCP and on the Unix socket.

use cache_server::client::{Code, KvEventKind, PageToSet, SharedTier};
use radix_tree::Tier;
use radixkv_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_then_lookup_and_load_return_the_same_bytes() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "");
    for (i, client) in [
        server.tcp_client(None).await,
        server.unix_client(None).await,
    ]
    .into_iter()
    .enumerate()
    {
        let scope = Scope::model(format!("m{i}"));
        let tokens = prompt(1, 5);
        // Pages 0..2, then 2..5 after them; a partial tail is ignored.
        let mut with_tail = tokens[..2 * PAGE].to_vec();
        with_tail.push(7);
        let out = client
            .store(&scope, &with_tail, 0, blocks(1, 0..2), BLOCK)
            .await
            .unwrap();
        assert_eq!((out.cached_pages, out.stored_pages), (0, 2));
        let out = client
            .store(&scope, &tokens, 2, blocks(1, 2..5), BLOCK)
            .await
            .unwrap();
        assert_eq!((out.cached_pages, out.stored_pages), (2, 3));

        let hit = client
            .lookup(&scope, &tokens, Some(10_000), false)
            .await
            .unwrap();
        assert_eq!((hit.pages, hit.tokens), (5, 5 * PAGE));
        assert!(hit.tiers.iter().all(|t| *t == Some(Tier::Host)));
        let info = client.info(&scope).await.unwrap();
        assert_eq!(hit.hashes, info.page_hashes(&tokens), "documented hashes");
        let lease = hit.lease.expect("a lease");
        let loaded = client.load(lease, 0, 0).await.unwrap();
        assert_eq!(loaded.len(), 5);
        for (p, b) in loaded.iter().enumerate() {
            assert_eq!(b.page, p);
            assert_eq!(b.hash, hit.hashes[p]);
            assert_eq!(&b.data[..], &block(1, p)[..], "page {p}");
        }
        // A sub-range.
        let part = client.load(lease, 3, 2).await.unwrap();
        assert_eq!(&part[1].data[..], &block(1, 4)[..]);
        client.release(lease).await.unwrap();
        // A longer prompt hits its cached prefix only.
        let longer: Vec<u32> = tokens.iter().copied().chain(900..908).collect();
        let hit = client.lookup(&scope, &longer, None, false).await.unwrap();
        assert_eq!(hit.pages, 5);
        assert!(hit.lease.is_none());
        // Storing it again stores nothing new.
        let out = client
            .store(&scope, &tokens, 0, blocks(1, 0..5), BLOCK)
            .await
            .unwrap();
        assert_eq!((out.cached_pages, out.stored_pages), (5, 0));
    }
    let stats = server.tcp_client(None).await.stats().await.unwrap();
    assert_eq!(stats.tenant, "default");
    assert_eq!(stats.pages, 10);
    let metrics = server.metrics_text();
    assert!(
        metrics.contains("radixkv_hit_tokens_total{tenant=\"default\",tier=\"host\"} 80"),
        "{metrics}"
    );
    assert!(metrics.contains("radixkv_request_seconds_count{method=\"Lookup\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_loads_and_stores_skip_the_socket() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "");
    let client = server.unix_client(None).await;
    let scope = Scope::model("m");
    let info = client.info(&scope).await.unwrap();
    let shm = SharedTier::open(&info).unwrap();
    let tokens = prompt(2, 4);

    // Store pages 0..4 by writing them into reserved slots.
    let (reservation, offsets) = client.reserve_shm(4, 10_000).await.unwrap();
    for (p, &off) in offsets.iter().enumerate() {
        shm.write(off, &block(2, p)).unwrap();
    }
    let out = client
        .commit_shm(reservation, &scope, &tokens, 0)
        .await
        .unwrap();
    assert_eq!(out.stored_pages, 4);
    // A reservation commits once.
    let again = client
        .commit_shm(reservation, &scope, &tokens, 0)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    let hit = client
        .lookup(&scope, &tokens, Some(10_000), false)
        .await
        .unwrap();
    let lease = hit.lease.unwrap();
    let offsets = client.load_shm(lease, 0, 0).await.unwrap();
    assert_eq!(offsets.len(), 4);
    for (p, &off) in offsets.iter().enumerate() {
        let bytes = shm.block(off).unwrap();
        assert_eq!(bytes, &block(2, p)[..], "page {p} in place");
    }
    // The same bytes over the socket.
    let loaded = client.load(lease, 0, 0).await.unwrap();
    assert_eq!(&loaded[3].data[..], &block(2, 3)[..]);
    client.release(lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_protect_blocks_from_eviction_and_expire() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "");
    let client = server.tcp_client(None).await;
    let scope = Scope::model("m");
    let kept = prompt(3, 4);
    client
        .store(&scope, &kept, 0, blocks(3, 0..4), BLOCK)
        .await
        .unwrap();
    let hit = client
        .lookup(&scope, &kept, Some(60_000), false)
        .await
        .unwrap();
    let lease = hit.lease.unwrap();
    // 400 pages through a cache of 64 host + 256 disk slots.
    for id in 100..200 {
        client
            .store(&scope, &prompt(id, 4), 0, blocks(id, 0..4), BLOCK)
            .await
            .unwrap();
    }
    let first = client
        .lookup(&scope, &prompt(100, 4), None, false)
        .await
        .unwrap();
    assert_eq!(first.pages, 0, "unleased pages were evicted");
    let loaded = client.load(lease, 0, 0).await.unwrap();
    for (p, b) in loaded.iter().enumerate() {
        assert_eq!(&b.data[..], &block(3, p)[..]);
    }
    client.release(lease).await.unwrap();
    assert_eq!(
        client.load(lease, 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );

    // A short lease expires; renewing keeps it.
    let hit = client
        .lookup(&scope, &kept, Some(300), false)
        .await
        .unwrap();
    let short = hit.lease.unwrap();
    let hit2 = client
        .lookup(&scope, &kept, Some(300), false)
        .await
        .unwrap();
    let renewed = hit2.lease.unwrap();
    client
        .renew(renewed.id, Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let err = client.load(short, 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(client.load(renewed, 0, 1).await.unwrap().len(), 1);
    client.release(renewed).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_keyed_calls_name_pages_without_tokens() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "");
    let client = server.tcp_client(None).await;
    let scope = Scope::model("hicache");
    let info = client.info(&scope).await.unwrap();
    let tokens = prompt(4, 6);
    let hashes = info.page_hashes(&tokens);
    let pages: Vec<PageToSet> = (0..4)
        .map(|p| PageToSet {
            hash: hashes[p],
            parent: p.checked_sub(1).map(|i| hashes[i]),
            tokens: tokens[p * PAGE..(p + 1) * PAGE].to_vec(),
            data: block(4, p).into(),
        })
        .collect();
    let out = client.set(&scope, pages).await.unwrap();
    assert_eq!(out.stored_pages, 4);
    assert_eq!(client.exists(&scope, &hashes).await.unwrap(), 4);
    let got = client.get(&scope, &hashes).await.unwrap();
    assert_eq!(got.len(), 4, "up to the first miss");
    // Counted for the tenant as stores and loads by tokens are.
    let page = server.metrics_text();
    assert_eq!(
        metric(&page, "radixkv_stored_pages_total{tenant=\"default\"}"),
        4.0
    );
    assert_eq!(
        metric(&page, "radixkv_loaded_bytes_total{tenant=\"default\"}"),
        (4 * BLOCK) as f64
    );
    for (p, b) in got.iter().enumerate() {
        assert_eq!(b.hash, hashes[p]);
        assert_eq!(&b.data[..], &block(4, p)[..]);
    }
    // The same pages by tokens.
    assert_eq!(
        client
            .lookup(&scope, &tokens, None, false)
            .await
            .unwrap()
            .pages,
        4
    );
    // A page whose tokens do not chain to its hash.
    let bad = PageToSet {
        hash: hashes[4],
        parent: Some(hashes[3]),
        tokens: vec![1, 2, 3, 4],
        data: block(4, 4).into(),
    };
    let err = client.set(&scope, vec![bad]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_start_with_a_snapshot_and_follow_every_change() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "");
    let client = server.tcp_client(None).await;
    let scope = Scope::model("m");
    let info = client.info(&scope).await.unwrap();
    let before = prompt(5, 2);
    client
        .store(&scope, &before, 0, blocks(5, 0..2), BLOCK)
        .await
        .unwrap();

    let mut events = client.events(&[]).await.unwrap();
    let snap = events.next().await.unwrap().unwrap();
    assert!(snap.snapshot);
    let snap_hashes: Vec<_> = snap.events.iter().map(|e| e.hash.unwrap()).collect();
    assert_eq!(snap_hashes, info.page_hashes(&before));
    assert!(snap
        .events
        .iter()
        .all(|e| e.kind == KvEventKind::Stored && e.tier == Some(Tier::Host)));

    let after = prompt(6, 3);
    client
        .store(&scope, &after, 0, blocks(6, 0..3), BLOCK)
        .await
        .unwrap();
    let mut stored = Vec::new();
    let mut last_seq = snap.seq;
    while stored.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("live events arrive")
            .unwrap()
            .unwrap();
        assert!(!batch.snapshot);
        for e in batch.events {
            assert!(e.seq > last_seq, "sequence numbers rise");
            last_seq = e.seq;
            assert_eq!(e.scope, scope);
            if e.kind == KvEventKind::Stored {
                stored.push((e.hash.unwrap(), e.parent));
            }
        }
    }
    let hashes = info.page_hashes(&after);
    assert_eq!(stored[0], (hashes[0], None));
    assert_eq!(stored[2], (hashes[2], Some(hashes[1])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pins_hold_a_prefix() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "");
    let client = server.tcp_client(None).await;
    let scope = Scope::model("agent");
    let history = prompt(7, 3);
    client
        .store(&scope, &history, 0, blocks(7, 0..3), BLOCK)
        .await
        .unwrap();
    let (pin, pages) = client
        .pin(&scope, &history, Duration::from_secs(30), 5)
        .await
        .unwrap();
    assert_eq!(pages, 3);
    assert_eq!(client.stats().await.unwrap().pinned_pages, 3);
    client.renew(pin, Duration::from_secs(60)).await.unwrap();
    client.unpin(pin).await.unwrap();
    assert_eq!(client.stats().await.unwrap().pinned_pages, 0);
    let err = client
        .pin(&scope, &prompt(8, 2), Duration::from_secs(1), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "nothing cached to pin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_too_slow_for_the_events_is_cut_off() {
    use proto::v1::cache_client::CacheClient;
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "[limits]\nevent_buffer = 64\n");
    let client = server.tcp_client(None).await;
    let scope = Scope::model("m");
    // A raw subscriber with HTTP/2's smallest default window (64 KiB; hyper
    // would otherwise grant megabytes), that stops
    // reading after the snapshot: the server's buffers fill quickly.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.tcp))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut raw = CacheClient::new(channel);
    let mut events = raw
        .events(proto::v1::EventsRequest { scopes: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(events.message().await.unwrap().unwrap().snapshot);
    // Thousands of events (stores, and the evictions they cause).
    for id in 0..25 {
        client
            .store(&scope, &prompt(id, 200), 0, blocks(id, 0..200), BLOCK)
            .await
            .unwrap();
    }
    let mut seen = 0;
    let lagged = loop {
        let batch = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("the stream ends")
            .unwrap()
            .expect("a final batch says how much was missed");
        if batch.lagged > 0 {
            break batch.lagged;
        }
        seen += batch.events.len();
    };
    assert!(lagged > 0, "cut off after {seen} events");
    assert!(
        events.message().await.unwrap().is_none(),
        "then the stream ends"
    );
    assert!(server
        .metrics_text()
        .contains("radixkv_event_subscribers_cut_off_total 1"));
    // The server serves on, and a fresh subscription gets a snapshot.
    let mut again = client.events(&[]).await.unwrap();
    let first = again.next().await.unwrap().unwrap();
    assert!(first.snapshot && !first.events.is_empty());
}
