//! Decode throughput at one and at eight sequences per step, straight
//! through [`Engine::step_limited`] (no HTTP, no scheduler thread), the two
//! measured in turns in one run so that their ratio survives a shared
//! machine. Beside the wall-clock rates, tokens per CPU-second of the
//! process (all threads, from Linux's per-thread scheduler statistics),
//! which a machine busy with other work disturbs far less:
//! `cargo test --release -p engine --test bench_decode -- --ignored --nocapture`.
//! With `BENCH_DECODE_ONLY=8` (or another count), only that many streams
//! run, for a profiler.

mod common;

use engine::{Engine, GenerateOptions, Sequence};
use std::time::Instant;

const TOPICS: [&str; 8] = [
    "a lighthouse keeper",
    "a clockmaker's apprentice",
    "a cat who runs a bakery",
    "two rival gardeners",
    "a robot learning to paint",
    "a lost mountain village",
    "a ship's cook at sea",
    "a librarian who collects maps",
];

/// Decode steps timed per batch size and round.
const STEPS: usize = 48;
const ROUNDS: usize = 3;

fn prompt(engine: &Engine, topic: &str) -> Vec<u32> {
    common::chat(
        engine,
        &[
            (
                "system",
                "You are a storyteller. Write long, vivid stories.",
            ),
            ("user", &format!("Tell me a story about {topic}.")),
        ],
    )
}

/// `n` sequences with their prompts run (cached after the first round), ready to
/// decode.
fn prefilled(engine: &Engine, prompts: &[Vec<u32>], n: usize) -> Vec<Sequence> {
    let mut options = GenerateOptions::new(STEPS + 2);
    options.stop_at_eos = false;
    options.tenant = "bench".into();
    let mut seqs: Vec<Sequence> = prompts[..n]
        .iter()
        .map(|p| engine.start(p, &options).unwrap())
        .collect();
    for seq in &mut seqs {
        while !seq.is_decoding() || seq.pending() != 1 {
            engine.step(&mut [seq]).unwrap();
        }
    }
    seqs
}

/// CPU time of this process so far, in seconds: the sum over its threads
/// of the time they ran (`/proc/self/task/*/schedstat`, nanoseconds).
/// Threads that ended are not counted, which is fine here: the pool's
/// threads live as long as the process.
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let nanos: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    nanos as f64 * 1e-9
}

/// Tokens per second and per CPU-second of `STEPS` decode steps over `n`
/// sequences together.
fn decode_rate(engine: &Engine, prompts: &[Vec<u32>], n: usize) -> (f64, f64) {
    let mut seqs = prefilled(engine, prompts, n);
    let limits = vec![1; n];
    let (began, cpu) = (Instant::now(), cpu_seconds());
    for _ in 0..STEPS {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        engine.step_limited(&mut refs, &limits).unwrap();
    }
    let tokens = (STEPS * n) as f64;
    let rates = (
        tokens / began.elapsed().as_secs_f64(),
        tokens / (cpu_seconds() - cpu),
    );
    for seq in seqs {
        engine.finish(seq);
    }
    rates
}

#[test]
#[ignore = "a benchmark"]
fn bench_decode() {
    let Some(engine) = common::engine() else {
        return;
    };
    let prompts: Vec<Vec<u32>> = TOPICS.iter().map(|t| prompt(engine, t)).collect();
    println!("threads: {}", rayon::current_num_threads());
    if let Some(n) = std::env::var("BENCH_DECODE_ONLY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        for _ in 0..ROUNDS {
            let (wall, cpu) = decode_rate(engine, &prompts, n);
            println!("{n} streams: {wall:6.1} tok/s ({cpu:6.1} per CPU-s)");
        }
        return;
    }
    // Best of the rounds: (wall, CPU) for one stream, then for eight.
    let mut best = [(0.0f64, 0.0f64); 2];
    for round in 0..ROUNDS {
        let rates = [
            decode_rate(engine, &prompts, 1),
            decode_rate(engine, &prompts, 8),
        ];
        let [(w1, c1), (w8, c8)] = rates;
        println!(
            "round {round}: 1 stream {w1:6.1} tok/s ({c1:6.1} per CPU-s), \
             8 streams {w8:6.1} tok/s ({c8:6.1} per CPU-s), x{:.2} (CPU x{:.2})",
            w8 / w1,
            c8 / c1
        );
        for (b, r) in best.iter_mut().zip(rates) {
            *b = (b.0.max(r.0), b.1.max(r.1));
        }
    }
    let [(w1, c1), (w8, c8)] = best;
    println!(
        "best: 1 stream {w1:.1} tok/s ({c1:.1} per CPU-s), 8 streams {w8:.1} tok/s \
         ({c8:.1} per CPU-s), x{:.2} (CPU x{:.2})",
        w8 / w1,
        c8 / c1
    );
}
