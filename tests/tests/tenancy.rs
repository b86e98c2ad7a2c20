//! Tenants: tokens name them, and no tenant can hit, load, pin or observe
//! another's blocks. Admin calls need the admin token. Quotas keep one
//! tenant from taking the whole cache.

use cache_server::client::Code;
use radixkv_tests::*;
use std::time::Duration;

const TENANTS: &str = r#"
admin_token = "admin-secret-token"
[[tenants]]
name = "alice"
token = "alice-secret-token"
shm = true
[[tenants]]
name = "bob"
token = "bob-secret-token"
[[tenants]]
name = "carol"
token = "carol-secret-token"
quota_pages = 8
"#;

const ALICE: Option<&str> = Some("alice-secret-token");
const BOB: Option<&str> = Some("bob-secret-token");
const CAROL: Option<&str> = Some("carol-secret-token");
const ADMIN: Option<&str> = Some("admin-secret-token");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_known_token_are_unauthenticated() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), TENANTS);
    let scope = Scope::model("m");
    for token in [None, Some("wrong-token-0000")] {
        let c = server.tcp_client(token).await;
        let err = c
            .lookup(&scope, &prompt(1, 1), None, false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
        let err = c
            .store(&scope, &prompt(1, 1), 0, blocks(1, 0..1), BLOCK)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let alice = server.tcp_client(ALICE).await;
    assert_eq!(alice.info(&scope).await.unwrap().tenant, "alice");
    // Admin calls: the admin token only.
    assert_eq!(
        alice.cluster_stats().await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let admin = server.tcp_client(ADMIN).await;
    assert!(admin.cluster_stats().await.is_ok());
    // The admin token is not a tenant.
    assert_eq!(
        admin.stats().await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_each_others_blocks() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), TENANTS);
    let alice = server.tcp_client(ALICE).await;
    let bob = server.tcp_client(BOB).await;
    let scope = Scope::model("shared-model");
    let a_prompt = prompt(10, 3);
    let b_prompt = prompt(11, 3);
    let mut bob_events = bob.events(&[]).await.unwrap();
    assert!(bob_events.next().await.unwrap().unwrap().events.is_empty());

    alice
        .store(&scope, &a_prompt, 0, blocks(10, 0..3), BLOCK)
        .await
        .unwrap();
    bob.store(&scope, &b_prompt, 0, blocks(11, 0..3), BLOCK)
        .await
        .unwrap();
    // Each hits its own, misses the other's: both directions.
    assert_eq!(
        alice
            .lookup(&scope, &a_prompt, None, false)
            .await
            .unwrap()
            .pages,
        3
    );
    assert_eq!(
        bob.lookup(&scope, &a_prompt, None, false)
            .await
            .unwrap()
            .pages,
        0
    );
    assert_eq!(
        bob.lookup(&scope, &b_prompt, None, false)
            .await
            .unwrap()
            .pages,
        3
    );
    assert_eq!(
        alice
            .lookup(&scope, &b_prompt, None, false)
            .await
            .unwrap()
            .pages,
        0
    );

    // Alice's lease id means nothing to Bob.
    let hit = alice
        .lookup(&scope, &a_prompt, Some(30_000), false)
        .await
        .unwrap();
    let lease = hit.lease.unwrap();
    assert_eq!(
        bob.load(lease, 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(bob.release(lease).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        bob.load_shm(lease, 0, 0).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(alice.load(lease, 0, 0).await.unwrap().len(), 3);
    // Nor her hashes, nor a pin on her prefix.
    assert_eq!(bob.exists(&scope, &hit.hashes).await.unwrap(), 0);
    assert!(bob.get(&scope, &hit.hashes).await.unwrap().is_empty());
    let err = bob
        .pin(&scope, &a_prompt, Duration::from_secs(5), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Stats count each tenant's own pages.
    assert_eq!(alice.stats().await.unwrap().pages, 3);
    assert_eq!(bob.stats().await.unwrap().pages, 3);
    // Bob's events show his pages only.
    let bob_info = bob.info(&scope).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(10), bob_events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.extend(batch.events.into_iter().map(|e| e.hash.unwrap()));
    }
    assert_eq!(seen, bob_info.page_hashes(&b_prompt));
    // Same tokens, separate namespaces: Bob storing Alice's prompt does not
    // make it a hit for... Alice's copy, nor the other way round.
    bob.store(&scope, &a_prompt, 0, blocks(99, 0..3), BLOCK)
        .await
        .unwrap();
    let bob_hit = bob
        .lookup(&scope, &a_prompt, Some(30_000), false)
        .await
        .unwrap();
    let bob_blocks = bob.load(bob_hit.lease.unwrap(), 0, 0).await.unwrap();
    assert_eq!(&bob_blocks[0].data[..], &block(99, 0)[..]);
    let alice_blocks = alice.load(lease, 0, 0).await.unwrap();
    assert_eq!(&alice_blocks[0].data[..], &block(10, 0)[..]);
    assert_ne!(bob_hit.hashes, hit.hashes, "namespaces seed the hashes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_makes_a_tenant_evict_its_own_pages() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), TENANTS);
    let alice = server.tcp_client(ALICE).await;
    let carol = server.tcp_client(CAROL).await;
    let scope = Scope::model("m");
    alice
        .store(&scope, &prompt(20, 4), 0, blocks(20, 0..4), BLOCK)
        .await
        .unwrap();
    for id in 30..40 {
        carol
            .store(&scope, &prompt(id, 2), 0, blocks(id, 0..2), BLOCK)
            .await
            .unwrap();
    }
    let stats = carol.stats().await.unwrap();
    assert_eq!(stats.quota_pages, 8);
    assert!(
        stats.tier_pages[1] <= 8,
        "carol keeps {} host pages",
        stats.tier_pages[1]
    );
    // The most recent of Carol's survive; Alice lost nothing.
    assert_eq!(
        carol
            .lookup(&scope, &prompt(39, 2), None, false)
            .await
            .unwrap()
            .pages,
        2
    );
    assert_eq!(
        alice
            .lookup(&scope, &prompt(20, 4), None, false)
            .await
            .unwrap()
            .pages,
        4
    );
    assert!(server
        .metrics_text()
        .contains("radixkv_quota_evictions_total{tenant=\"carol\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_invalidate_one_tenants_namespace() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), TENANTS);
    let alice = server.tcp_client(ALICE).await;
    let bob = server.tcp_client(BOB).await;
    let admin = server.tcp_client(ADMIN).await;
    let scope = Scope::model("m");
    alice
        .store(&scope, &prompt(1, 2), 0, blocks(1, 0..2), BLOCK)
        .await
        .unwrap();
    bob.store(&scope, &prompt(1, 2), 0, blocks(1, 0..2), BLOCK)
        .await
        .unwrap();
    assert_eq!(admin.invalidate("alice", &scope).await.unwrap(), 2);
    assert_eq!(
        alice
            .lookup(&scope, &prompt(1, 2), None, false)
            .await
            .unwrap()
            .pages,
        0
    );
    assert_eq!(
        bob.lookup(&scope, &prompt(1, 2), None, false)
            .await
            .unwrap()
            .pages,
        2
    );
    let all = admin.cluster_stats().await.unwrap();
    let names: Vec<&str> = all.iter().map(|t| t.tenant.as_str()).collect();
    assert!(
        names.contains(&"alice") && names.contains(&"bob"),
        "{names:?}"
    );
    assert_eq!(
        bob.invalidate("alice", &scope).await.unwrap_err().code(),
        Code::PermissionDenied
    );
}
