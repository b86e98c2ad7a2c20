//! Restarts and transport security: a SIGTERM'd server comes back warm;
//! a server listening beyond loopback needs tokens and TLS.

use cache_server::client::Client;
use radix_tree::Tier;
use radixkv_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_sigterm_is_warm() {
    let root = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(root.path(), "");
    let scope = Scope::model("m");
    {
        let c = server.tcp_client(None).await;
        for id in 0..6 {
            c.store(&scope, &prompt(id, 3), 0, blocks(id, 0..3), BLOCK)
                .await
                .unwrap();
        }
    }
    // Write-back: the blocks are only in host RAM until the graceful stop.
    assert!(server.terminate(), "a clean exit on SIGTERM");
    let server = server.restart();
    let c = server.tcp_client(None).await;
    for id in 0..6 {
        let hit = c
            .lookup(&scope, &prompt(id, 3), Some(10_000), false)
            .await
            .unwrap();
        assert_eq!(hit.pages, 3, "prompt {id} is warm");
        assert!(hit.tiers.iter().all(|t| *t == Some(Tier::Disk)));
        let lease = hit.lease.unwrap();
        for (p, b) in c.load(lease, 0, 0).await.unwrap().iter().enumerate() {
            assert_eq!(&b.data[..], &block(id, p)[..], "prompt {id} page {p}");
        }
        // Through shared memory too: promoted to host on the way.
        let info = c.info(&scope).await.unwrap();
        let shm = cache_server::client::SharedTier::open(&info).unwrap();
        let offsets = c.load_shm(lease, 0, 0).await.unwrap();
        assert_eq!(shm.block(offsets[2]).unwrap(), &block(id, 2)[..]);
        c.release(lease).await.unwrap();
    }
}

#[test]
fn a_server_beyond_loopback_without_tokens_or_tls_refuses_to_start() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let config = dir.join("open.toml");
    std::fs::write(
        &config,
        format!("listen = \"0.0.0.0:0\"\ndata_dir = \"{}\"\n", dir.display()),
    )
    .unwrap();
    let out = std::process::Command::new(server_binary())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_its_certificate() {
    let root = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["radixkv.test".to_string()]).unwrap();
    let cert_pem = cert.cert.pem();
    std::fs::write(root.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(
        root.path().join("key.pem"),
        cert.signing_key.serialize_pem(),
    )
    .unwrap();
    let extra = format!(
        "[[tenants]]\nname = \"alice\"\ntoken = \"alice-secret-token\"\n\
         [tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n",
        root.path().display()
    );
    let server = ServerProcess::start(root.path(), &extra);
    let c = Client::connect_tls(
        &server.tcp.to_string(),
        "radixkv.test",
        cert_pem.as_bytes(),
        Some("alice-secret-token"),
    )
    .await
    .unwrap();
    let scope = Scope::model("m");
    c.store(&scope, &prompt(1, 2), 0, blocks(1, 0..2), BLOCK)
        .await
        .unwrap();
    assert_eq!(
        c.lookup(&scope, &prompt(1, 2), None, false)
            .await
            .unwrap()
            .pages,
        2
    );
    // Plain text to a TLS port gets nowhere.
    let plain = Client::connect(&server.tcp.to_string(), Some("alice-secret-token")).await;
    if let Ok(plain) = plain {
        assert!(plain.health().await.is_err());
    }
}
