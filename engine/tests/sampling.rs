//! Sampled decoding and stop strings: a seed gives the same tokens alone,
//! batched with other requests, with its prefix cached or not, and when
//! preempted and resumed; different seeds give different tokens; a tiny
//! nucleus decodes greedily; a stop string ends the sequence with the
//! token that completes it.

mod common;

use engine::{Event, FinishReason, GenerateOptions, Sampling, Scheduler, SchedulerConfig};
use std::collections::HashSet;
use std::sync::atomic::Ordering;

fn options(max: usize, sampling: Sampling, use_cache: bool, tenant: &str) -> GenerateOptions {
    let mut o = GenerateOptions::new(max);
    o.sampling = sampling;
    o.use_cache = use_cache;
    o.stop_at_eos = false;
    o.tenant = tenant.into();
    o
}

fn hot(seed: u64) -> Sampling {
    Sampling::new(1.0, 0.95, seed).unwrap()
}

const QUESTIONS: [&str; 4] = [
    "Tell me a story about a fox.",
    "What should I cook tonight?",
    "Describe the sea in a few words.",
    "Invent a name for a cat.",
];

#[test]
fn a_seed_gives_the_same_tokens_alone_cached_batched_and_preempted() {
    let Some(engine) = common::engine() else {
        return;
    };
    let n = 20;
    let prompts: Vec<Vec<u32>> = QUESTIONS
        .iter()
        .map(|q| common::chat(engine, &[("system", "You are playful."), ("user", q)]))
        .collect();
    // Request i samples with seed 100 + i; the last one is greedy, batched
    // in among them.
    let sampling = |i: usize| {
        if i == prompts.len() - 1 {
            Sampling::greedy()
        } else {
            hot(100 + i as u64)
        }
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            engine
                .generate(p, &options(n, sampling(i), false, "sampled-alone"))
                .unwrap()
                .tokens
        })
        .collect();
    assert_eq!(alone[0].len(), n);

    // Cached: the first run stores the prompt, the second reads it.
    let o = options(n, sampling(0), true, "sampled-cached");
    let first = engine.generate(&prompts[0], &o).unwrap();
    let second = engine.generate(&prompts[0], &o).unwrap();
    assert_eq!(first.cached_tokens, 0);
    assert!(second.cached_tokens > 0);
    assert_eq!(first.tokens, alone[0]);
    assert_eq!(second.tokens, alone[0]);

    // Batched under a KV budget so small that sequences are preempted and
    // resume (from the cache) partway through their output.
    let config = SchedulerConfig {
        prefill_tokens: 64,
        kv_pages: 5,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::start(engine.clone(), config).unwrap();
    let mut rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            sched
                .submit(p.clone(), options(n, sampling(i), true, "sampled-batched"))
                .unwrap()
        })
        .collect();
    let batched: Vec<Vec<u32>> = rxs
        .iter_mut()
        .map(|rx| loop {
            match rx.blocking_recv().expect("the request ends") {
                Event::Done(g) => return g.tokens,
                Event::Failed(e) => panic!("{e}"),
                _ => {}
            }
        })
        .collect();
    let s = sched.stats();
    assert!(s.max_batch_seen.load(Ordering::Relaxed) >= 2);
    assert!(
        s.preempted.load(Ordering::Relaxed) > 0,
        "nothing was preempted"
    );
    assert_eq!(batched, alone);
}

#[test]
fn different_seeds_give_different_tokens() {
    let Some(engine) = common::engine() else {
        return;
    };
    let prompt = common::chat(engine, &[("user", "Write a line of a poem about rain.")]);
    let n = 8;
    let greedy = engine
        .generate(&prompt, &options(n, Sampling::greedy(), true, "seeds"))
        .unwrap()
        .tokens;
    let outputs: Vec<Vec<u32>> = (1..=4)
        .map(|seed| {
            let s = Sampling::new(1.0, 1.0, seed).unwrap();
            engine
                .generate(&prompt, &options(n, s, true, "seeds"))
                .unwrap()
                .tokens
        })
        .collect();
    // At temperature 1 over the whole vocabulary, eight tokens of a poem
    // agree across seeds only by a long chance.
    let distinct: HashSet<&Vec<u32>> = outputs.iter().collect();
    assert!(
        distinct.len() >= 3,
        "{} distinct outputs of 4",
        distinct.len()
    );
    assert!(outputs.iter().any(|o| *o != greedy));
}

#[test]
fn a_tiny_nucleus_decodes_greedily() {
    let Some(engine) = common::engine() else {
        return;
    };
    let prompt = common::chat(engine, &[("user", "Name a colour.")]);
    let n = 10;
    let greedy = engine
        .generate(&prompt, &options(n, Sampling::greedy(), true, "nucleus"))
        .unwrap()
        .tokens;
    for seed in [1, 2] {
        let s = Sampling::new(2.0, 1e-6, seed).unwrap();
        let got = engine
            .generate(&prompt, &options(n, s, true, "nucleus"))
            .unwrap();
        assert_eq!(got.tokens, greedy, "seed {seed}");
    }
}

#[test]
fn a_stop_string_ends_the_sequence_at_the_token_that_completes_it() {
    let Some(engine) = common::engine() else {
        return;
    };
    let tk = engine.tokenizer();
    let prompt = common::chat(
        engine,
        &[("user", "Explain in two sentences what a library is.")],
    );
    let n = 24;
    let full = engine
        .generate(&prompt, &options(n, Sampling::greedy(), true, "stop"))
        .unwrap();
    assert_eq!(full.tokens.len(), n);
    // A stop string across several tokens, from the middle of the output.
    let stop = tk.decode(&full.tokens[10..13]).unwrap();
    assert!(stop.len() > 3, "{stop:?}");
    let end = (1..=n)
        .find(|&k| tk.decode(&full.tokens[..k]).unwrap().contains(&stop))
        .unwrap();
    let mut o = options(n, Sampling::greedy(), true, "stop");
    o.stop = vec!["never in this text \u{1F600}".into(), stop.clone()];
    let got = engine.generate(&prompt, &o).unwrap();
    assert_eq!(got.finish, FinishReason::Stop);
    assert_eq!(got.tokens, full.tokens[..end]);
    assert!(end < n);

    // One that never comes: the sequence runs to its length.
    o.stop = vec!["never in this text \u{1F600}".into()];
    let got = engine.generate(&prompt, &o).unwrap();
    assert_eq!(got.finish, FinishReason::Length);
    assert_eq!(got.tokens, full.tokens);

    // Bad stop lists are refused.
    o.stop = vec!["a".into(); 5];
    assert!(engine.generate(&prompt, &o).is_err());
    o.stop = vec![String::new()];
    assert!(engine.generate(&prompt, &o).is_err());
}
