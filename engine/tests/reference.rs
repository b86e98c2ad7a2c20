//! The tokenizer and the forward pass against llama.cpp's reference
//! vectors (`data/engine/smollm2_vectors.json`) and against an independent
//! float64 forward of the same dequantized weights.

mod common;

use engine::GenerateOptions;

#[test]
fn tokenizer_reproduces_the_reference_ids_and_decodes_back() {
    let Some(engine) = common::engine() else {
        return;
    };
    let v = common::vectors();
    let text = v["tokenize"]["text"].as_str().unwrap();
    let expected = common::ids(&v["tokenize"]["ids"]);
    let ids = engine.tokenizer().encode(text).unwrap();
    assert_eq!(ids, expected);
    assert_eq!(engine.tokenizer().decode(&ids).unwrap(), text);
    let prompt = v["generate"]["prompt"].as_str().unwrap();
    assert_eq!(
        engine.tokenizer().encode(prompt).unwrap(),
        common::ids(&v["generate"]["prompt_ids"])
    );
}

/// The logits after the prompt and llama.cpp's first 8 tokens, where the
/// exact F32 forward and llama.cpp (quantized kernels) part ways: a float64
/// forward of the dequantized weights (numpy, written apart from this
/// crate) gives 20.282636 for token 11087 and 20.075344 for token 940.
const FLOAT64_LOGITS: [(usize, f32); 3] = [(11087, 20.282636), (940, 20.075344), (3187, 18.492738)];

/// The engine on F32 weights computes that forward to within `f32`
/// rounding.
#[test]
fn logits_match_a_float64_forward_of_the_same_weights() {
    let Some(engine) = common::f32_engine() else {
        return;
    };
    let logits = engine.next_token_logits(&reference_prompt()).unwrap();
    for (token, expected) in FLOAT64_LOGITS {
        let got = logits[token];
        assert!(
            (got - expected).abs() < 2e-3,
            "token {token}: {got} vs {expected}"
        );
    }
}

/// The default engine (quantized weights times 8-bit activations, as
/// llama.cpp) stays near it.
#[test]
fn quantized_logits_stay_near_a_float64_forward_of_the_same_weights() {
    let Some(engine) = common::engine() else {
        return;
    };
    let logits = engine.next_token_logits(&reference_prompt()).unwrap();
    for (token, expected) in FLOAT64_LOGITS {
        let got = logits[token];
        eprintln!("token {token}: {got} vs {expected}");
        assert!(
            (got - expected).abs() < QUANTIZED_TOLERANCE,
            "token {token}: {got} vs {expected}"
        );
    }
}

/// How far the 8-bit activations may move these logits.
const QUANTIZED_TOLERANCE: f32 = 0.5;

fn reference_prompt() -> Vec<u32> {
    let v = common::vectors();
    let mut prompt = common::ids(&v["generate"]["prompt_ids"]);
    prompt.extend_from_slice(&common::ids(&v["generate"]["greedy_ids"])[..8]);
    prompt
}

#[test]
fn greedy_output_follows_llama_cpp() {
    let Some(engine) = common::engine() else {
        return;
    };
    let v = common::vectors();
    let prompt = common::ids(&v["generate"]["prompt_ids"]);
    let expected = common::ids(&v["generate"]["greedy_ids"]);
    let mut options = GenerateOptions::new(expected.len());
    options.use_cache = false;
    options.stop_at_eos = false;
    let out = engine.generate(&prompt, &options).unwrap();
    let matched = out
        .tokens
        .iter()
        .zip(&expected)
        .take_while(|(a, b)| a == b)
        .count();
    eprintln!(
        "greedy: the first {matched} of {} tokens match llama.cpp (prefill {:?}, decode {:?})",
        expected.len(),
        out.prefill_time,
        out.decode_time
    );
    // The default arithmetic is llama.cpp's (quantized weights times 8-bit
    // activations) and follows it for 17 tokens; the exact F32 forward
    // parts from it at token 9, where the two best logits are 0.2 apart
    // (see the tests above).
    assert!(
        matched >= 17,
        "only {matched} tokens match: {:?} vs {expected:?}",
        out.tokens
    );
}

/// The engine on F32 weights against candle-transformers' `quantized_llama`
/// over the same GGUF dequantized to F32 (an F32 forward written apart from
/// this crate: `scripts/candle-oracle` wrote
/// `data/engine/candle_f32_greedy.json`): all 40 greedy tokens agree. Both
/// part from llama.cpp's reference at token 9.
#[test]
fn greedy_output_equals_an_independent_f32_forward_token_for_token() {
    let Some(engine) = common::f32_engine() else {
        return;
    };
    let v = common::vectors();
    let prompt = common::ids(&v["generate"]["prompt_ids"]);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../data/engine/candle_f32_greedy.json"
    );
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the oracle's file"))
            .expect("json");
    let expected = common::ids(&oracle["greedy_ids"]);
    assert_eq!(expected.len(), 40);
    let mut options = GenerateOptions::new(expected.len());
    options.use_cache = false;
    options.stop_at_eos = false;
    let out = engine.generate(&prompt, &options).unwrap();
    assert_eq!(out.tokens, expected);
}

/// Teacher-forced: after the prompt and llama.cpp's first `k` tokens, its
/// next token is our best one, or within a quantization-noise margin of it.
#[test]
fn llama_cpp_tokens_are_near_the_top_at_every_position() {
    let Some(engine) = common::engine() else {
        return;
    };
    let v = common::vectors();
    let mut context = common::ids(&v["generate"]["prompt_ids"]);
    let expected = common::ids(&v["generate"]["greedy_ids"]);
    let mut agree = 0;
    for &want in &expected {
        let logits = engine.next_token_logits(&context).unwrap();
        let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let margin = best - logits[want as usize];
        assert!(
            margin < 0.5,
            "token {want} after {} tokens is {margin} below the best",
            context.len()
        );
        agree += usize::from(margin == 0.0);
        context.push(want);
    }
    eprintln!(
        "teacher-forced: our best token is llama.cpp's at {agree} of {} positions",
        expected.len()
    );
    assert!(agree >= 36, "{agree} of {}", expected.len());
}
