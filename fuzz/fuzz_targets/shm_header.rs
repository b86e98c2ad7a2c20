//! The `shm_header` fuzz target: see `radixkv_fuzz::shm` for the input format
//! and the properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radixkv_fuzz::shm::run(data));
