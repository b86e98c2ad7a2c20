//! Continuous batching changes no token: requests batched together, cut
//! into prefill chunks, or preempted for KV space and resumed give exactly
//! what each gives alone.

mod common;

use engine::{Event, GenerateOptions, Scheduler, SchedulerConfig};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const QUESTIONS: [&str; 4] = [
    "What is a radix tree?",
    "Name two uses of a hash map, briefly.",
    "Why is the sky blue? Answer in one sentence, as a physicist would to a child.",
    "Write a haiku about caches.",
];

/// The tests of this binary one at a time: the cancellation test counts
/// the cache's leases, which the others take too.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn options(max: usize, use_cache: bool, tenant: &str) -> GenerateOptions {
    let mut o = GenerateOptions::new(max);
    o.use_cache = use_cache;
    o.stop_at_eos = false;
    o.tenant = tenant.into();
    o
}

fn prompts(engine: &engine::Engine) -> Vec<Vec<u32>> {
    QUESTIONS
        .iter()
        .map(|q| common::chat(engine, &[("system", "You are brief."), ("user", q)]))
        .collect()
}

/// Each prompt's greedy output alone, without the cache.
fn alone(engine: &engine::Engine, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| {
            engine
                .generate(p, &options(n, false, "alone"))
                .unwrap()
                .tokens
        })
        .collect()
}

/// Submits every prompt at once and collects each one's streamed tokens.
fn together(sched: &Scheduler, prompts: &[Vec<u32>], n: usize, tenant: &str) -> Vec<Vec<u32>> {
    let mut rxs: Vec<_> = prompts
        .iter()
        .map(|p| sched.submit(p.clone(), options(n, true, tenant)).unwrap())
        .collect();
    rxs.iter_mut()
        .map(|rx| {
            let mut streamed = Vec::new();
            loop {
                match rx.blocking_recv().expect("the request ends with Done") {
                    Event::Started { .. } => {}
                    Event::Token(t) => streamed.push(t),
                    Event::Done(g) => {
                        assert_eq!(g.tokens, streamed, "streamed and final tokens differ");
                        return streamed;
                    }
                    Event::Failed(e) => panic!("{e}"),
                }
            }
        })
        .collect()
}

#[test]
fn concurrent_requests_share_steps_and_match_each_run_alone() {
    let _serial = serial();
    let Some(engine) = common::engine() else {
        return;
    };
    let n = 12;
    let prompts = prompts(engine);
    let expected = alone(engine, &prompts, n);
    // Small prefill chunks: prompts are cut and mixed with decodes.
    let config = SchedulerConfig {
        prefill_tokens: 20,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::start(engine.clone(), config).unwrap();
    let got = together(&sched, &prompts, n, "together");
    assert_eq!(got, expected);
    let s = sched.stats();
    assert!(
        s.max_batch_seen.load(Ordering::Relaxed) >= 3,
        "at most {} sequences shared a step",
        s.max_batch_seen.load(Ordering::Relaxed)
    );
    assert!(s.batched_steps.load(Ordering::Relaxed) >= n as u64);
    assert_eq!(s.preempted.load(Ordering::Relaxed), 0);
    assert_eq!(s.completed.load(Ordering::Relaxed), prompts.len() as u64);
}

#[test]
fn a_tiny_kv_budget_preempts_and_changes_nothing() {
    let _serial = serial();
    let Some(engine) = common::engine() else {
        return;
    };
    let n = 24;
    let prompts = prompts(engine);
    let expected = alone(engine, &prompts, n);
    let config = SchedulerConfig {
        prefill_tokens: 64,
        kv_pages: 5,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::start(engine.clone(), config).unwrap();
    let got = together(&sched, &prompts, n, "tiny");
    assert_eq!(got, expected);
    let s = sched.stats();
    assert!(
        s.preempted.load(Ordering::Relaxed) > 0,
        "nothing was preempted"
    );
    assert_eq!(s.failed.load(Ordering::Relaxed), 0);
    // Every page is given back (the counter is published after the step
    // that sent the last token).
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.kv_pages.load(Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "KV pages still held");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_dropped_receiver_cancels_its_request_and_releases_its_lease() {
    let _serial = serial();
    let Some(engine) = common::engine() else {
        return;
    };
    let prompts = prompts(engine);
    let sched = Scheduler::start(engine.clone(), SchedulerConfig::default()).unwrap();
    // Cache the prompt, so that the cancelled request holds a lease.
    sched
        .generate(prompts[0].clone(), options(2, true, "cancel"))
        .unwrap();
    let leases = || engine.cache().unwrap().index().stats().leases;
    let mut rx = sched
        .submit(prompts[0].clone(), options(2000, true, "cancel"))
        .unwrap();
    let mut got = 0;
    while got < 3 {
        match rx.blocking_recv().unwrap() {
            Event::Token(_) => got += 1,
            Event::Started { cached_tokens, .. } => assert!(cached_tokens > 0),
            e => panic!("{e:?}"),
        }
    }
    assert!(leases() > 0);
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sched.stats().cancelled.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the request was never cancelled");
        std::thread::sleep(Duration::from_millis(5));
    }
    while sched.stats().running.load(Ordering::Relaxed) != 0 || leases() != 0 {
        assert!(Instant::now() < deadline, "the lease was not released");
        std::thread::sleep(Duration::from_millis(5));
    }
    // And the scheduler keeps serving.
    let again = sched
        .generate(prompts[1].clone(), options(3, true, "cancel"))
        .unwrap();
    assert_eq!(again.tokens.len(), 3);
}
