//! The local socket: Lookup, Release, Renew and Health without HTTP/2, for
//! engines on the same machine. Same answers, leases, tenancy, limits and
//! metrics as the gRPC calls; bad frames are statuses and the server keeps
//! serving.

use cache_server::client::Code;
use cache_server::local::{call, header, parse_header, HEADER};
use radixkv_tests::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const TENANTS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-secret-token"
[[tenants]]
name = "bob"
token = "bob-secret-token"
"#;
const ALICE: Option<&str> = Some("alice-secret-token");
const BOB: Option<&str> = Some("bob-secret-token");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_over_the_local_socket_match_grpc_and_lease_the_same_pages() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "");
    let grpc = server.unix_client(None).await;
    let scope = Scope::model("m");
    let tokens = prompt(1, 6);
    grpc.store(&scope, &tokens, 0, blocks(1, 0..6), BLOCK)
        .await
        .unwrap();

    let mut local = server.local_client(None);
    assert!(local.health().unwrap());
    let by_grpc = grpc.lookup(&scope, &tokens, None, false).await.unwrap();
    let by_local = local.lookup(&scope, &tokens, None, false).unwrap();
    assert_eq!(by_local.pages, 6);
    assert_eq!(by_local.tokens, 6 * PAGE);
    assert_eq!(by_local.hashes, by_grpc.hashes);
    assert_eq!(by_local.tiers, by_grpc.tiers);
    assert!(by_local.lease.is_none());
    let miss = local.lookup(&scope, &prompt(2, 3), None, false).unwrap();
    assert_eq!(miss.pages, 0);
    // A partial tail is not a page.
    let mut longer = tokens.clone();
    longer.extend([7, 7]);
    assert_eq!(local.lookup(&scope, &longer, None, false).unwrap().pages, 6);

    // A lease taken here is the server's: gRPC loads under it, the local
    // socket renews and releases it.
    let hit = local.lookup(&scope, &tokens, Some(10_000), false).unwrap();
    let lease = hit.lease.expect("a hit with lease_ms is leased");
    let loaded = grpc.load(lease, 0, 0).await.unwrap();
    assert_eq!(loaded.len(), 6);
    for b in &loaded {
        assert_eq!(&b.data[..], &block(1, b.page)[..]);
    }
    assert!(local.renew(lease.id, Duration::from_secs(20)).unwrap() > lease.expires_ms);
    local.release(lease).unwrap();
    let gone = local.release(lease).unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone}");
    assert_eq!(grpc.stats().await.unwrap().leases, 0);
    // Counted as the gRPC calls are: one lookup over gRPC, four here.
    let page = server.metrics_text();
    assert_eq!(
        metric(&page, "radixkv_request_seconds_count{method=\"Lookup\"}"),
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_socket_authenticates_and_keeps_tenants_apart() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), TENANTS);
    let scope = Scope::model("m");
    let tokens = prompt(3, 4);
    server
        .unix_client(ALICE)
        .await
        .store(&scope, &tokens, 0, blocks(3, 0..4), BLOCK)
        .await
        .unwrap();

    let wrong = LocalClient::connect(&server.local, Some("not-a-known-token")).unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let mut anonymous = server.local_client(None);
    let err = anonymous.lookup(&scope, &tokens, None, false).unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut alice = server.local_client(ALICE);
    let mut bob = server.local_client(BOB);
    assert_eq!(alice.lookup(&scope, &tokens, None, false).unwrap().pages, 4);
    assert_eq!(bob.lookup(&scope, &tokens, None, false).unwrap().pages, 0);
    // Alice's lease is unknown to Bob.
    let lease = alice
        .lookup(&scope, &tokens, Some(10_000), false)
        .unwrap()
        .lease
        .unwrap();
    assert_eq!(bob.release(lease).unwrap_err().code(), Code::NotFound);
    assert_eq!(
        bob.renew(lease.id, Duration::from_secs(5))
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    alice.release(lease).unwrap();
}

/// Sends raw bytes and reads one answer frame: (status, body).
fn exchange(stream: &mut UnixStream, bytes: &[u8]) -> std::io::Result<(u8, Vec<u8>)> {
    stream.write_all(bytes)?;
    let mut h = [0u8; HEADER];
    stream.read_exact(&mut h)?;
    let (len, status) = parse_header(&h);
    let mut body = vec![0; len];
    stream.read_exact(&mut body)?;
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_on_the_local_socket_are_statuses_and_the_server_serves_on() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), "");
    let connect = || {
        let s = UnixStream::connect(&server.local).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };

    // An unknown call and a malformed message: INVALID_ARGUMENT, and the
    // connection goes on.
    let mut s = connect();
    let (status, body) = exchange(&mut s, &header(0, 99)).unwrap();
    assert_eq!(i32::from(status), Code::InvalidArgument as i32);
    assert!(String::from_utf8_lossy(&body).contains("unknown call"));
    let mut garbage = header(3, call::LOOKUP).to_vec();
    garbage.extend([0xff, 0xff, 0xff]);
    let (status, _) = exchange(&mut s, &garbage).unwrap();
    assert_eq!(i32::from(status), Code::InvalidArgument as i32);
    // Token ids out of range and a token that is not text are the
    // handlers' and auth's statuses.
    let (status, _) = exchange(
        &mut s,
        &[header(2, call::AUTHENTICATE).to_vec(), vec![0xc3, 0x28]].concat(),
    )
    .unwrap();
    assert_eq!(i32::from(status), Code::Unauthenticated as i32);
    let (status, _) = exchange(&mut s, &header(0, call::HEALTH)).unwrap();
    assert_eq!(status, 0, "the connection still serves");

    // A length over the message limit: RESOURCE_EXHAUSTED, then closed.
    let mut s = connect();
    let (status, _) = exchange(&mut s, &header(u32::MAX as usize, call::LOOKUP)).unwrap();
    assert_eq!(i32::from(status), Code::ResourceExhausted as i32);
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "the server closed it");

    // A frame cut short and a client that vanishes mid-frame.
    let mut s = connect();
    s.write_all(&header(100, call::LOOKUP)).unwrap();
    s.write_all(&[1, 2, 3]).unwrap();
    drop(s);

    let mut local = server.local_client(None);
    assert!(local.health().unwrap());
    assert!(server.unix_client(None).await.health().await.unwrap());
}
