//! The `disk_headers` fuzz target: see `radixkv_fuzz::disk` for the input format
//! and the properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radixkv_fuzz::disk::run(data));
