//! Writes the seed corpora, `fuzz/corpus/<target>/seed-<n>`, from the
//! encoders (see `radixkv_fuzz::seeds`). Run after a format change:
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, run) in radixkv_fuzz::TARGETS {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        for (i, seed) in radixkv_fuzz::seeds(name).iter().enumerate() {
            run(seed); // a seed must pass its own harness
            std::fs::write(dir.join(format!("seed-{i:02}")), seed)?;
        }
        println!("{name}: {} seeds", radixkv_fuzz::seeds(name).len());
    }
    Ok(())
}
