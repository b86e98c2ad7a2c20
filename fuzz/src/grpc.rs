//! `grpc_requests`: the sidecar's request decoding and validation. Each
//! input is a program of calls, each one a request message's bytes, sent
//! through prost's decoding into the same handlers a client's call reaches
//! (`cache_server::server::harness`), over a small cache holding two
//! prompts. Properties:
//! - no input makes a handler panic: bad bytes and bad values are statuses;
//! - whatever the calls did, the index's invariants hold afterwards.
//!
//! Input: repeated `[call byte][u16 length][body]`. For the client-stream
//! calls (Store, Set) the body is the raw request body: gRPC frames, so
//! tonic's framing is fuzzed with the messages.

use crate::Input;
use ::cache_server::server::harness::{frame, Harness, CALLS};
use ::cache_server::server::ServerConfig;
use prost::Message;
use proto::v1::*;

const PAGE: usize = 4;
const BLOCK: usize = 256;

fn harness() -> Harness {
    let shm = std::env::temp_dir().join(format!("radixkv-fuzz-{}.shm", std::process::id()));
    let config = ServerConfig {
        page_size: PAGE,
        block_bytes: BLOCK,
        host_bytes: 32 * BLOCK,
        disk_bytes: 0,
        vocab_size: 1000,
        shm_path: Some(shm),
        limits: ::cache_server::server::Limits {
            max_message_bytes: 1 << 16,
            max_tokens_per_request: 256,
            max_leases_per_tenant: 8,
            max_ttl_ms: 60_000,
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    let h = Harness::new(config).expect("a small cache opens");
    let a: Vec<u32> = (0..16).collect();
    let b: Vec<u32> = (0..8).chain(100..108).collect();
    h.store(&a, &vec![1u8; 4 * BLOCK]).unwrap();
    h.store(&b, &vec![2u8; 4 * BLOCK]).unwrap();
    h
}

pub fn run(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h = harness();
    let mut u = Input::new(data);
    rt.block_on(async {
        for _ in 0..32 {
            if u.is_empty() {
                break;
            }
            let call = u.byte();
            let len = usize::from(u.u16() % 4096);
            let body = u.bytes(len);
            let _ = h.call(call, body).await;
        }
    });
    h.cache().index().check_invariants();
}

fn tokens(t: &[u32]) -> Vec<u8> {
    t.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn call(out: &mut Vec<u8>, name: &str, body: Vec<u8>) {
    let i = CALLS.iter().position(|c| *c == name).unwrap();
    out.push(i as u8);
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(&body);
}

pub fn seeds() -> Vec<Vec<u8>> {
    let a: Vec<u32> = (0..16).collect();
    let scope = Some(Scope::default());
    let lookup = LookupRequest {
        scope: scope.clone(),
        tokens: tokens(&a),
        lease_ms: 1000,
        prefetch: true,
    }
    .encode_to_vec();
    let mut s1 = Vec::new();
    call(&mut s1, "Lookup", lookup.clone());
    call(&mut s1, "LookupLeased", lookup.clone());
    call(
        &mut s1,
        "Load",
        LoadRequest {
            lease_id: 1,
            first_page: 0,
            pages: 2,
        }
        .encode_to_vec(),
    );
    call(
        &mut s1,
        "LoadShm",
        LoadRequest {
            lease_id: 2,
            first_page: 1,
            pages: 0,
        }
        .encode_to_vec(),
    );
    call(
        &mut s1,
        "Release",
        ReleaseRequest { lease_id: 1 }.encode_to_vec(),
    );
    call(
        &mut s1,
        "Renew",
        RenewRequest {
            lease_id: 2,
            ttl_ms: 500,
        }
        .encode_to_vec(),
    );
    let mut s2 = Vec::new();
    call(
        &mut s2,
        "ReserveShm",
        ReserveShmRequest {
            pages: 3,
            ttl_ms: 1000,
        }
        .encode_to_vec(),
    );
    call(
        &mut s2,
        "CommitShm",
        CommitShmRequest {
            reservation_id: 2,
            header: Some(StoreHeader {
                scope: scope.clone(),
                tokens: tokens(&(0..12).map(|t| t + 500).collect::<Vec<_>>()),
                first_page: 0,
                output_tokens: 12,
            }),
        }
        .encode_to_vec(),
    );
    call(
        &mut s2,
        "Pin",
        PinRequest {
            scope: scope.clone(),
            tokens: tokens(&a),
            ttl_ms: 1000,
            priority: 3,
        }
        .encode_to_vec(),
    );
    call(&mut s2, "Unpin", UnpinRequest { pin_id: 1 }.encode_to_vec());
    let mut s3 = Vec::new();
    call(
        &mut s3,
        "Exists",
        ExistsRequest {
            scope: scope.clone(),
            hashes: vec![vec![0; 16], vec![1; 3]],
        }
        .encode_to_vec(),
    );
    call(
        &mut s3,
        "Get",
        GetRequest {
            scope: scope.clone(),
            hashes: vec![vec![7; 16]],
        }
        .encode_to_vec(),
    );
    call(
        &mut s3,
        "Events",
        EventsRequest {
            scopes: vec![Scope::default()],
        }
        .encode_to_vec(),
    );
    call(&mut s3, "Stats", Vec::new());
    call(&mut s3, "Info", InfoRequest { scope: scope.clone() }.encode_to_vec());
    call(
        &mut s3,
        "Invalidate",
        InvalidateRequest {
            tenant: "default".into(),
            scope: None,
        }
        .encode_to_vec(),
    );
    call(&mut s3, "Health", Vec::new());

    // Client streams: a store in two frames, then hash-keyed sets of a
    // chain (the second page after the first), one with a wrong parent.
    let fresh: Vec<u32> = (200..212).collect();
    let mut s4 = Vec::new();
    let mut store = frame(&StoreRequest {
        header: Some(StoreHeader {
            scope: scope.clone(),
            tokens: tokens(&fresh),
            first_page: 0,
            output_tokens: 40,
        }),
        data: vec![3; 2 * BLOCK].into(),
    });
    store.extend(frame(&StoreRequest {
        header: None,
        data: vec![4; BLOCK].into(),
    }));
    call(&mut s4, "Store", store);
    let seed = harness().namespace_seed().unwrap();
    let p0: Vec<u32> = (300..304).collect();
    let p1: Vec<u32> = (304..308).collect();
    let (h0, h1) = (seed.chain(&p0), seed.chain(&p0).chain(&p1));
    let set = |hash: radix_tree::PageHash, parent: Option<radix_tree::PageHash>, t: &[u32]| {
        frame(&SetRequest {
            scope: scope.clone(),
            hash: hash.to_le_bytes().to_vec(),
            parent: parent.map(|p| p.to_le_bytes().to_vec()).unwrap_or_default(),
            tokens: tokens(t),
            data: vec![5; BLOCK].into(),
        })
    };
    let mut chain = set(h0, None, &p0);
    chain.extend(set(h1, Some(h0), &p1));
    call(&mut s4, "Set", chain);
    call(&mut s4, "Set", set(h1, Some(h1), &p1));
    call(
        &mut s4,
        "Exists",
        ExistsRequest {
            scope: scope.clone(),
            hashes: vec![h0.to_le_bytes().to_vec(), h1.to_le_bytes().to_vec()],
        }
        .encode_to_vec(),
    );
    vec![s1, s2, s3, s4]
}
