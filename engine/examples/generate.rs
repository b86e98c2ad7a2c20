//! Measures the engine on this machine: prefill and decode tokens per
//! second, and time to first token with a cold prompt versus one whose
//! long system prompt is cached.
//!
//! ```text
//! cargo run --release -p engine --example generate -- [--system-tokens N] [--new-tokens N]
//! ```

use anyhow::{bail, Context};
use engine::{Engine, EngineConfig, GenerateOptions, Generation};

fn main() -> anyhow::Result<()> {
    let mut system_tokens = 1000usize;
    let mut new_tokens = 64usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value =
            || -> anyhow::Result<usize> { Ok(args.next().context("a value")?.parse()?) };
        match a.as_str() {
            "--system-tokens" => system_tokens = value()?,
            "--new-tokens" => new_tokens = value()?,
            other => bail!("unknown argument {other}; see the example's docs"),
        }
    }
    let load = std::time::Instant::now();
    let engine = Engine::load(EngineConfig::builder().build()?)?;
    println!(
        "model {} loaded in {:.2?}",
        engine.model().id(),
        load.elapsed()
    );
    let tok = engine.tokenizer();

    // A long system prompt (tool definitions, say), then two different users.
    let sentence = "The assistant can call the tool `search(query)` to look things up and `fetch(url)` to read a page; it cites each source it uses. ";
    let mut system = String::new();
    while tok.encode(&system)?.len() < system_tokens {
        system.push_str(sentence);
    }
    let prompt = |user: &str| -> anyhow::Result<Vec<u32>> {
        Ok(tok.encode(&format!(
            "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ))?)
    };
    let a = prompt("Explain what a radix tree is in two sentences.")?;
    let b = prompt("Which tool would you use to read a web page?")?;
    let mut options = GenerateOptions::new(new_tokens);
    options.stop_at_eos = false;

    let cold = engine.generate(&a, &options)?;
    report("cold (nothing cached)", &cold);
    let warm = engine.generate(&b, &options)?;
    report("warm (system prompt cached)", &warm);
    let again = engine.generate(&a, &options)?;
    report("repeat (whole prompt cached)", &again);
    assert_eq!(again.tokens, cold.tokens, "the cache changed the output");
    println!("\n{}", tok.decode(&cold.tokens)?);
    Ok(())
}

fn report(what: &str, g: &Generation) {
    let computed = g.computed_prompt_tokens;
    let decoded = g.tokens.len().saturating_sub(1);
    println!(
        "{what}: prompt {} tokens, {} cached, {computed} computed; TTFT {:.1?}; prefill {:.0} tok/s; decode {:.1} tok/s",
        g.prompt_tokens,
        g.cached_tokens,
        g.ttft,
        computed as f64 / g.prefill_time.as_secs_f64(),
        decoded as f64 / g.decode_time.as_secs_f64(),
    );
}
