//! Greedy tokens of candle-transformers' `quantized_llama` on the reference
//! prompt, with every weight of the GGUF dequantized to F32 (or, with
//! `--quantized`, on candle's own quantized kernels):
//!
//! `candle-oracle MODEL.gguf VECTORS.json [--quantized] > out.json`
//!
//! It reads `generate.prompt_ids` and the length of `generate.greedy_ids`
//! from the vectors file, and prints a JSON object with the tokens it
//! generated and how many leading ones agree with `greedy_ids`.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use std::error::Error;
use std::fs::File;
use std::path::PathBuf;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// Writes a copy of the GGUF at `path` with every tensor as F32.
fn dequantized_copy(path: &str, dev: &Device) -> Result<PathBuf, Box<dyn Error>> {
    let mut file = File::open(path)?;
    let ct = gguf_file::Content::read(&mut file)?;
    let mut tensors = Vec::new();
    for (name, info) in &ct.tensor_infos {
        let q = info.read(&mut file, ct.tensor_data_offset, dev)?;
        tensors.push((
            name.clone(),
            QTensor::quantize(&q.dequantize(dev)?, GgmlDType::F32)?,
        ));
    }
    let out = std::env::temp_dir().join(format!("candle-oracle-{}.gguf", std::process::id()));
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut File::create(&out)?, &metadata, &tensors)?;
    Ok(out)
}

fn argmax(logits: &Tensor) -> Result<u32, Box<dyn Error>> {
    let l = logits.squeeze(0)?.to_vec1::<f32>()?;
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: candle-oracle MODEL.gguf VECTORS.json [--quantized]".into());
    }
    let quantized = args.iter().any(|a| a == "--quantized");
    let dev = Device::Cpu;
    let model_path = if quantized {
        PathBuf::from(&args[1])
    } else {
        dequantized_copy(&args[1], &dev)?
    };
    let mut file = File::open(&model_path)?;
    let ct = gguf_file::Content::read(&mut file)?;
    let mut model = ModelWeights::from_gguf(ct, &mut file, &dev)?;
    if !quantized {
        std::fs::remove_file(&model_path)?;
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args[2])?)?;
    let prompt = ids(&v["generate"]["prompt_ids"]);
    let reference = ids(&v["generate"]["greedy_ids"]);
    let mut logits = model.forward(&Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?, 0)?;
    let mut tokens = Vec::with_capacity(reference.len());
    for pos in prompt.len()..prompt.len() + reference.len() {
        let next = argmax(&logits)?;
        tokens.push(next);
        logits = model.forward(&Tensor::new(&[next], &dev)?.unsqueeze(0)?, pos)?;
    }
    let agree = tokens
        .iter()
        .zip(&reference)
        .take_while(|(a, b)| a == b)
        .count();
    let out = serde_json::json!({
        "source": format!(
            "candle-transformers 0.11.1 quantized_llama (engine/oracle, scripts/candle-oracle), \
             greedy on generate.prompt_ids of smollm2_vectors.json, {}",
            if quantized {
                "candle's own Q4_1/Q8_0 kernels"
            } else {
                "every weight of the GGUF dequantized to F32"
            }
        ),
        "greedy_ids": tokens,
        "agrees_with_reference_on_first": agree,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
