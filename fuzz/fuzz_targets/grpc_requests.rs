//! The `grpc_requests` fuzz target: see `radixkv_fuzz::grpc` for the input
//! format and the properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radixkv_fuzz::grpc::run(data));
