//! Shared by the engine's integration tests: the model (or a skip), the
//! reference vectors.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use engine::{default_model_path, Engine, EngineConfig};
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The fetched model's path; `None` (with a message) when it is missing.
pub fn model_path() -> Option<PathBuf> {
    let path = default_model_path();
    if !path.exists() {
        // Straight to stderr, past the test harness's capture.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: model not fetched; run scripts/fetch-model ({} is missing)",
            path.display()
        );
        return None;
    }
    Some(path)
}

/// The engine over the fetched model, shared by a test binary's tests;
/// `None` (with a message) when the model is not fetched.
pub fn engine() -> Option<&'static Arc<Engine>> {
    static ENGINE: OnceLock<Option<Arc<Engine>>> = OnceLock::new();
    ENGINE.get_or_init(|| load(256 << 20, false)).as_ref()
}

/// As [`engine`], on F32 weights (exact F32 arithmetic), for tests against
/// a float reference.
pub fn f32_engine() -> Option<&'static Arc<Engine>> {
    static ENGINE: OnceLock<Option<Arc<Engine>>> = OnceLock::new();
    ENGINE.get_or_init(|| load(64 << 20, true)).as_ref()
}

fn load(host_bytes: usize, f32_weights: bool) -> Option<Arc<Engine>> {
    let config = EngineConfig::builder()
        .model_path(model_path()?)
        .host_bytes(host_bytes)
        .f32_weights(f32_weights)
        .build()
        .expect("config");
    Some(Arc::new(Engine::load(config).expect("the model loads")))
}

/// `data/engine/smollm2_vectors.json`.
pub fn vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../data/engine/smollm2_vectors.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("the vectors file")).expect("json")
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// A ChatML prompt of `turns` (role, content), ready for the assistant.
pub fn chat(engine: &Engine, turns: &[(&str, &str)]) -> Vec<u32> {
    let mut text = String::new();
    for (role, content) in turns {
        text.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    text.push_str("<|im_start|>assistant\n");
    engine.tokenizer().encode(&text).unwrap()
}
