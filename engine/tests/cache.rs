//! The cache saves work and changes nothing: greedy output with a cached
//! prefix is token for token the output without it.

mod common;

use engine::GenerateOptions;

use common::chat;

fn options(max: usize, use_cache: bool, tenant: &str) -> GenerateOptions {
    let mut o = GenerateOptions::new(max);
    o.use_cache = use_cache;
    o.stop_at_eos = false;
    o.tenant = tenant.into();
    o
}

#[test]
fn a_repeated_prompt_is_served_from_the_cache_with_identical_output() {
    let Some(engine) = common::engine() else {
        return;
    };
    let prompt = chat(
        engine,
        &[
            ("system", "You are a concise assistant. Answer in one short paragraph, and prefer plain words."),
            ("user", "Why do caches speed up programs? Give one example from web browsers."),
        ],
    );
    let n = 12;
    let cold = engine
        .generate(&prompt, &options(n, false, "repeat"))
        .unwrap();
    let first = engine
        .generate(&prompt, &options(n, true, "repeat"))
        .unwrap();
    let second = engine
        .generate(&prompt, &options(n, true, "repeat"))
        .unwrap();
    assert_eq!(first.cached_tokens, 0);
    assert_eq!(first.computed_prompt_tokens, prompt.len());
    assert!(first.stored_pages >= prompt.len() / 16);
    let ps = engine.layout().page_size;
    assert_eq!(second.cached_tokens, prompt.len() / ps * ps);
    assert!(
        second.computed_prompt_tokens < 16,
        "{} computed",
        second.computed_prompt_tokens
    );
    assert_eq!(first.tokens, cold.tokens);
    assert_eq!(second.tokens, cold.tokens);
}

#[test]
fn a_wholly_cached_prompt_reruns_only_its_last_token() {
    let Some(engine) = common::engine() else {
        return;
    };
    let mut prompt = chat(engine, &[("user", "Name three colours of the rainbow.")]);
    let ps = engine.layout().page_size;
    prompt.truncate(prompt.len() / ps * ps);
    assert!(prompt.len() >= ps);
    let n = 6;
    let cold = engine
        .generate(&prompt, &options(n, false, "whole"))
        .unwrap();
    engine
        .generate(&prompt, &options(n, true, "whole"))
        .unwrap();
    let warm = engine
        .generate(&prompt, &options(n, true, "whole"))
        .unwrap();
    assert_eq!(warm.cached_tokens, prompt.len());
    assert_eq!(warm.computed_prompt_tokens, 1);
    assert_eq!(warm.tokens, cold.tokens);
}

#[test]
fn the_next_turn_finds_the_whole_history_cached() {
    let Some(engine) = common::engine() else {
        return;
    };
    let system = ("system", "You are a helpful assistant who answers briefly.");
    let turn1 = chat(engine, &[system, ("user", "What is a prefix tree?")]);
    let n = 24;
    let out1 = engine.generate(&turn1, &options(n, true, "turns")).unwrap();
    let reply = engine.tokenizer().decode(&out1.tokens).unwrap();
    // Turn 2: turn 1's prompt and reply, then a new user message.
    let mut turn2 = turn1.clone();
    turn2.extend_from_slice(&out1.tokens);
    turn2.extend(engine.tokenizer().encode("<|im_end|>\n<|im_start|>user\nAnd a radix tree?<|im_end|>\n<|im_start|>assistant\n").unwrap());
    let warm = engine.generate(&turn2, &options(n, true, "turns")).unwrap();
    let cold = engine
        .generate(&turn2, &options(n, false, "turns"))
        .unwrap();
    let ps = engine.layout().page_size;
    // Every whole page of turn 1's prompt and of its reply (the last reply
    // token was never run, so its KV does not exist).
    let history = (turn1.len() + out1.tokens.len() - 1) / ps * ps;
    assert!(
        warm.cached_tokens >= history,
        "{} cached of {history} ({reply:?})",
        warm.cached_tokens
    );
    assert!(
        warm.cached_tokens > turn1.len(),
        "the reply's pages are cached too"
    );
    assert_eq!(
        warm.computed_prompt_tokens,
        turn2.len() - warm.cached_tokens
    );
    assert_eq!(warm.tokens, cold.tokens);
}

#[test]
fn bad_requests_get_typed_errors() {
    let Some(engine) = common::engine() else {
        return;
    };
    use engine::EngineError;
    let o = GenerateOptions::new(4);
    assert!(matches!(
        engine.generate(&[], &o),
        Err(EngineError::EmptyPrompt)
    ));
    assert!(matches!(
        engine.generate(&[1, 49152], &o),
        Err(EngineError::TokenOutOfVocab { id: 49152, .. })
    ));
    let long = vec![198u32; 8190];
    assert!(matches!(
        engine.generate(&long, &o),
        Err(EngineError::ContextTooLong { .. })
    ));
    assert!(matches!(
        engine.generate(&[1, 2], &GenerateOptions::new(0)),
        Err(EngineError::InvalidArgument(_))
    ));
}
