//! radixkv's gRPC contract, generated from `proto/radixkv/v1/cache.proto`
//! at build time. Only this crate and `cache-server` (its service and its
//! client) know these types; everything else speaks domain types.

#![allow(missing_debug_implementations, clippy::all)]

/// Version 1 of the contract.
pub mod v1 {
    tonic::include_proto!("radixkv.v1");
}

/// The contract's source, for clients that generate their own stubs.
pub const CACHE_PROTO: &str = include_str!("../proto/radixkv/v1/cache.proto");
