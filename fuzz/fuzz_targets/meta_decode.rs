//! The `meta_decode` fuzz target: see `radixkv_fuzz::meta` for the input format
//! and the properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radixkv_fuzz::meta::run(data));
