//! Compiles the contract with `protox` (pure Rust), so a build needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/radixkv/v1/cache.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Block payloads as `Bytes`: handed between buffers without copies.
        .bytes(".radixkv.v1.Block.data")
        .bytes(".radixkv.v1.StoreRequest.data")
        .bytes(".radixkv.v1.SetRequest.data")
        .compile_fds(fds)?;
    Ok(())
}
