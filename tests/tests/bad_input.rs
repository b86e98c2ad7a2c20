//! Every limit and every bad input gets its status, and the server keeps
//! serving.

use bytes::Bytes;
use cache_server::client::{Code, LeaseHandle};
use radixkv_tests::*;
use std::io::Write;
use std::time::Duration;

const LIMITS: &str = r#"
[limits]
max_tokens_per_request = 64
max_leases_per_tenant = 3
max_pinned_pages_per_tenant = 4
max_ttl_ms = 60000
max_message_bytes = 65536
"#;

/// The status a call that must fail failed with.
fn code<T>(r: Result<T, cache_server::client::ClientError>) -> Code {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.code(),
    }
}

async fn still_serving(server: &ServerProcess) {
    let c = server.tcp_client(None).await;
    assert!(c.health().await.unwrap());
    let scope = Scope::model("alive");
    c.store(&scope, &prompt(9, 1), 0, blocks(9, 0..1), BLOCK)
        .await
        .unwrap();
    assert_eq!(
        c.lookup(&scope, &prompt(9, 1), None, false)
            .await
            .unwrap()
            .pages,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), LIMITS);
    let c = server.tcp_client(None).await;
    let scope = Scope::model("m");
    let tokens = prompt(1, 2);
    // Wrong block sizes: short, long, not a whole block.
    assert_eq!(
        code(c.store(&scope, &tokens, 0, blocks(1, 0..1), BLOCK).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.store(&scope, &tokens, 0, blocks(1, 0..3), BLOCK).await),
        Code::InvalidArgument
    );
    let ragged = Bytes::from(vec![0u8; 2 * BLOCK - 1]);
    assert_eq!(
        code(c.store(&scope, &tokens, 0, ragged, BLOCK).await),
        Code::InvalidArgument
    );
    // A first page past the prompt; pages after a gap.
    assert_eq!(
        code(c.store(&scope, &tokens, 3, Bytes::new(), BLOCK).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.store(&scope, &tokens, 1, blocks(1, 1..2), BLOCK).await),
        Code::FailedPrecondition
    );
    // Tokens out of range, and too many tokens.
    let mut bad = tokens.clone();
    bad[3] = VOCAB;
    assert_eq!(
        code(c.lookup(&scope, &bad, None, false).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.store(&scope, &bad, 0, blocks(1, 0..2), BLOCK).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.lookup(&scope, &prompt(2, 17), None, false).await),
        Code::InvalidArgument
    );
    // Leases: unknown, zero TTL, TTL above the limit.
    let ghost = LeaseHandle {
        id: 424_242,
        expires_ms: 0,
    };
    assert_eq!(code(c.load(ghost, 0, 0).await), Code::NotFound);
    assert_eq!(code(c.release(ghost).await), Code::NotFound);
    c.store(&scope, &tokens, 0, blocks(1, 0..2), BLOCK)
        .await
        .unwrap();
    assert_eq!(
        code(c.lookup(&scope, &tokens, Some(60_001), false).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.renew(1, Duration::ZERO).await),
        Code::InvalidArgument
    );
    // A range outside the lease.
    let lease = c
        .lookup(&scope, &tokens, Some(5_000), false)
        .await
        .unwrap()
        .lease
        .unwrap();
    assert_eq!(code(c.load(lease, 1, 2).await), Code::OutOfRange);
    // The lease cap (3 per tenant).
    let l2 = c.lookup(&scope, &tokens, Some(5_000), false).await.unwrap();
    let l3 = c.lookup(&scope, &tokens, Some(5_000), false).await.unwrap();
    assert_eq!(
        code(c.lookup(&scope, &tokens, Some(5_000), false).await),
        Code::ResourceExhausted
    );
    c.release(lease).await.unwrap();
    // The pinned-pages cap (4 per tenant), once the leases are gone.
    c.release(l2.lease.unwrap()).await.unwrap();
    c.release(l3.lease.unwrap()).await.unwrap();
    let long = prompt(3, 5);
    c.store(&scope, &long, 0, blocks(3, 0..5), BLOCK)
        .await
        .unwrap();
    assert_eq!(
        code(c.pin(&scope, &long, Duration::from_secs(5), 0).await),
        Code::ResourceExhausted
    );
    // Within the cap, a pin is granted.
    let (pin, pages) = c
        .pin(&scope, &tokens, Duration::from_secs(5), 0)
        .await
        .unwrap();
    assert_eq!(pages, 2);
    c.unpin(pin).await.unwrap();
    assert_eq!(c.exists(&scope, &[]).await.unwrap(), 0);
    // A message above the size limit.
    let huge = Bytes::from(vec![0u8; 8 * BLOCK * 2]);
    let r = c.store(&scope, &prompt(4, 16), 0, huge, 16 * BLOCK).await;
    assert!(matches!(
        code(r),
        Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
    ));
    // Shared-memory reservations: no pages, too many, no TTL.
    assert_eq!(code(c.reserve_shm(0, 1000).await), Code::InvalidArgument);
    assert_eq!(
        code(c.reserve_shm(1 << 20, 1000).await),
        Code::InvalidArgument
    );
    assert_eq!(code(c.reserve_shm(1, 0).await), Code::InvalidArgument);
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_sockets_does_not_stop_the_server() {
    let root = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(root.path(), "");
    let mut seed = 0x1234_5678_u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    for round in 0..20 {
        let mut bytes = noise(1 + round * 97);
        if round % 2 == 0 {
            // A valid HTTP/2 preface, then garbage frames.
            let mut framed = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            framed.append(&mut bytes);
            bytes = framed;
        }
        if let Ok(mut s) = std::net::TcpStream::connect(server.tcp) {
            let _ = s.write_all(&bytes);
        }
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&server.unix) {
            let _ = s.write_all(&bytes);
        }
        if let Ok(mut s) = std::net::TcpStream::connect(server.metrics) {
            let _ = s.write_all(&bytes);
        }
    }
    assert!(server.alive());
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_stream_costs_nothing() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "");
    let scope = Scope::model("m");
    let tokens = prompt(5, 8);
    {
        let c = server.tcp_client(None).await;
        c.store(&scope, &tokens, 0, blocks(5, 0..8), BLOCK)
            .await
            .unwrap();
        let hit = c
            .lookup(&scope, &tokens, Some(60_000), false)
            .await
            .unwrap();
        // Read one block of eight, then drop the stream and the connection.
        let lease = hit.lease.unwrap();
        let mut read = 0;
        let task = tokio::spawn({
            let c = c.clone();
            async move {
                let _ = c
                    .load_each(lease, 0, 0, |_, _| {
                        read += 1;
                    })
                    .await;
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        task.abort();
    }
    still_serving(&server).await;
    // The abandoned lease expires on its own; a fresh client works.
    let c = server.unix_client(None).await;
    assert_eq!(
        c.lookup(&scope, &tokens, None, false).await.unwrap().pages,
        8
    );
}
