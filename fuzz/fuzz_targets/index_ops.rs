//! The `index_ops` fuzz target: see `radixkv_fuzz::index_ops` for the input format
//! and the properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radixkv_fuzz::index_ops::run(data));
