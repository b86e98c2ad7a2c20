//! Remote mode: the engine keeps its KV pages in a radixkv server (started
//! in-process on a Unix socket, its host tier in shared memory) and gets
//! the same tokens as without the cache, reading cached pages in place.

use cache_server::server::{Server, ServerConfig};
use engine::{
    default_model_path, Engine, EngineConfig, GenerateOptions, KvLayout, ModelConfig, RemoteStore,
};
use std::io::Write;
use std::sync::Arc;

#[test]
fn generation_through_a_cache_server_is_cached_and_unchanged() {
    let path = default_model_path();
    if !path.exists() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: model not fetched; run scripts/fetch-model ({} is missing)",
            path.display()
        );
        return;
    }
    let layout = KvLayout::new(&ModelConfig::read(&path).unwrap(), 16);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("radixkv.sock");
    let config = ServerConfig {
        listen: None,
        unix_socket: Some(socket.clone()),
        metrics_listen: None,
        data_dir: dir.path().to_path_buf(),
        page_size: layout.page_size,
        block_bytes: layout.block_bytes(),
        layout: layout.digest(),
        host_bytes: 128 * layout.block_bytes(),
        disk_bytes: 0,
        shm_path: Some(dir.path().join("host.shm")),
        ..ServerConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(Server::start(config)).unwrap();

    let store = RemoteStore::connect(&format!("unix:{}", socket.display()), None).unwrap();
    assert!(store.uses_shm(), "the server's host tier is mapped");
    let engine = Engine::load(
        EngineConfig::builder()
            .model_path(&path)
            .store(Arc::new(store))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(engine.cache().is_none());
    let text = "<|im_start|>system\nYou are a concise assistant. Answer in one short paragraph, and prefer plain words.<|im_end|>\n<|im_start|>user\nWhat is shared memory?<|im_end|>\n<|im_start|>assistant\n";
    let prompt = engine.tokenizer().encode(text).unwrap();
    let mut options = GenerateOptions::new(12);
    options.stop_at_eos = false;
    let mut cold = options.clone();
    cold.use_cache = false;
    let reference = engine.generate(&prompt, &cold).unwrap();
    let first = engine.generate(&prompt, &options).unwrap();
    let second = engine.generate(&prompt, &options).unwrap();
    assert_eq!(first.cached_tokens, 0);
    assert!(first.stored_pages >= prompt.len() / 16);
    assert_eq!(second.cached_tokens, prompt.len() / 16 * 16);
    assert!(second.computed_prompt_tokens < 16);
    assert_eq!(first.tokens, reference.tokens);
    assert_eq!(second.tokens, reference.tokens);
    // The pages are the server's (its shared memory, read in place).
    let stats = server.cache().index().stats();
    assert!(stats.pages as usize >= first.stored_pages);
    assert_eq!(
        engine
            .stats()
            .lookup_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        engine
            .stats()
            .store_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(engine);
    runtime.block_on(server.shutdown()).unwrap();
}
