//! A minimal client of OpenAI-compatible servers for `bench engine`: one
//! HTTP/1.1 request per connection over `std::net::TcpStream` (no HTTP
//! dependency), the body read as it arrives (chunked or not), and a
//! streamed answer's server-sent events timestamped one by one, so that
//! the time to first token is measured when its bytes arrive.

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Reads an HTTP/1.1 chunked body, ending at the zero-size chunk.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: usize,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            left: 0,
            done: false,
        }
    }

    fn next_chunk(&mut self) -> std::io::Result<()> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut line = String::new();
        if self.inner.read_line(&mut line)? == 0 {
            return Err(bad("connection closed inside a chunked body"));
        }
        let size = line.trim().split(';').next().unwrap_or("");
        self.left = usize::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
        if self.left == 0 {
            self.done = true;
        }
        Ok(())
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            self.next_chunk()?;
            if self.done {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..n])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

/// An answer's status and a reader of its body.
pub struct Response {
    pub status: u16,
    body: Box<dyn BufRead + Send>,
}

impl Response {
    /// Reads the status line and headers from `r`.
    pub fn read_from(mut r: Box<dyn BufRead + Send>) -> Result<Self> {
        let mut line = String::new();
        r.read_line(&mut line).context("reading the status line")?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let (mut chunked, mut length) = (false, None);
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                bail!("connection closed inside the headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                } else if name == "content-length" {
                    length = value.parse::<u64>().ok();
                }
            }
        }
        let body: Box<dyn BufRead + Send> = if chunked {
            Box::new(BufReader::new(Chunked::new(r)))
        } else if let Some(n) = length {
            Box::new(BufReader::new(r.take(n)))
        } else {
            r
        };
        Ok(Self { status, body })
    }

    /// The whole body as text.
    pub fn text(mut self) -> Result<String> {
        let mut s = String::new();
        self.body.read_to_string(&mut s)?;
        Ok(s)
    }

    /// Server-sent events: each event's data (its `data:` lines joined),
    /// handed to `f` with the instant its last line arrived, until the body
    /// ends or `f` returns false.
    pub fn events(mut self, mut f: impl FnMut(&str, Instant) -> bool) -> Result<()> {
        let mut data = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            let eof = self.body.read_line(&mut line)? == 0;
            let l = line.trim_end_matches(['\r', '\n']);
            if eof || l.is_empty() {
                if !data.is_empty() && !f(&data, Instant::now()) {
                    return Ok(());
                }
                data.clear();
                if eof {
                    return Ok(());
                }
            } else if let Some(d) = l.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            } else if let Some(e) = l.strip_prefix("error:") {
                // llama.cpp's server writes errors on their own field.
                bail!("server error in the stream: {}", e.trim());
            }
        }
    }
}

/// Sends one request (`Connection: close`) and reads the answer's head.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Accept: text/event-stream, application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    Response::read_from(Box::new(BufReader::new(stream)))
}

/// A streamed completion, as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    /// The generated text, every chunk's content joined.
    pub text: String,
    /// Since the request was sent: the first and last chunks with text.
    pub first: Option<Duration>,
    pub last: Option<Duration>,
    /// Chunks that carried text.
    pub text_chunks: usize,
    /// From the answer's `usage` (the last one seen), when it gives one.
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Prompt tokens the server did not compute: OpenAI's
    /// `usage.prompt_tokens_details.cached_tokens`, else llama.cpp's
    /// `timings.cache_n`.
    pub cached_tokens: Option<u64>,
    pub finish_reason: Option<String>,
}

impl Streamed {
    /// Tokens generated: the server's count, else one per text chunk.
    pub fn tokens(&self) -> u64 {
        self.completion_tokens.unwrap_or(self.text_chunks as u64)
    }

    /// Folds one event's JSON into the record; `at` is its arrival since
    /// the request was sent. Errors on an error object.
    pub fn absorb(&mut self, data: &str, at: Duration) -> Result<()> {
        let v: Value = serde_json::from_str(data).with_context(|| format!("event {data:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("server error: {e}");
        }
        if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
            let text = choice
                .get("delta")
                .and_then(|d| d.get("content"))
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if !text.is_empty() {
                self.text.push_str(text);
                self.text_chunks += 1;
                self.first.get_or_insert(at);
                self.last = Some(at);
            }
            if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(f.to_string());
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.prompt_tokens = u.get("prompt_tokens").and_then(Value::as_u64);
            self.completion_tokens = u.get("completion_tokens").and_then(Value::as_u64);
            if let Some(c) = u
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
            {
                self.cached_tokens = Some(c);
            }
        }
        if self.cached_tokens.is_none() {
            if let Some(c) = v.pointer("/timings/cache_n").and_then(Value::as_u64) {
                self.cached_tokens = Some(c);
            }
        }
        Ok(())
    }
}

/// POSTs `body` (with `"stream": true` set) to `path` and reads the
/// streamed answer to its end.
pub fn stream(addr: SocketAddr, path: &str, body: &Value) -> Result<Streamed> {
    let mut body = body.clone();
    body["stream"] = Value::Bool(true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let sent = Instant::now();
    let resp = request(addr, "POST", path, Some(&body))?;
    if resp.status != 200 {
        let status = resp.status;
        bail!("{path}: HTTP {status}: {}", resp.text().unwrap_or_default());
    }
    parse_stream(resp, sent)
}

/// Reads a streamed answer's events into a [`Streamed`]; `sent` is when the
/// request went out.
pub fn parse_stream(resp: Response, sent: Instant) -> Result<Streamed> {
    let mut out = Streamed::default();
    let mut failed = None;
    let mut done = false;
    resp.events(|data, at| {
        if data.trim() == "[DONE]" {
            done = true;
            return false;
        }
        match out.absorb(data, at.duration_since(sent)) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    ensure!(done, "the stream ended without [DONE]");
    Ok(out)
}

/// GETs `path`; the status and the body.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let resp = request(addr, "GET", path, None)?;
    let status = resp.status;
    Ok((status, resp.text()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn chunked(body: &str, piece: usize) -> String {
        let mut s = String::new();
        for c in body.as_bytes().chunks(piece) {
            s.push_str(&format!("{:x}\r\n", c.len()));
            s.push_str(std::str::from_utf8(c).unwrap());
            s.push_str("\r\n");
        }
        s.push_str("0\r\n\r\n");
        s
    }

    fn response(raw: String) -> Response {
        Response::read_from(Box::new(Cursor::new(raw.into_bytes()))).unwrap()
    }

    #[test]
    fn chunked_sse_stream_is_parsed() {
        let events = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}"#,
            "[DONE]",
        ];
        let body: String = events
            .iter()
            .map(|e| format!("data: {e}\r\n\r\n"))
            .collect();
        // Chunks cut across lines and events, as a server's writes may.
        let raw = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{}",
            chunked(&body, 7)
        );
        let r = response(raw);
        assert_eq!(r.status, 200);
        let s = parse_stream(r, Instant::now()).unwrap();
        assert_eq!(s.text, "Hello");
        assert_eq!(s.text_chunks, 2);
        assert!(s.first.is_some() && s.first <= s.last);
        assert_eq!(s.prompt_tokens, Some(12));
        assert_eq!(s.tokens(), 3);
        assert_eq!(s.cached_tokens, Some(8));
        assert_eq!(s.finish_reason.as_deref(), Some("length"));
    }

    #[test]
    fn completions_and_llama_timings() {
        let body = concat!(
            "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"text\":\"b\",\"finish_reason\":\"stop\"}],",
            "\"timings\":{\"cache_n\":990,\"prompt_n\":10}}\n\n",
            "data: [DONE]\n\n"
        );
        let raw = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let s = parse_stream(response(raw), Instant::now()).unwrap();
        assert_eq!(s.text, "ab");
        assert_eq!(s.tokens(), 2, "one token per chunk without usage");
        assert_eq!(s.cached_tokens, Some(990));
    }

    #[test]
    fn errors_and_truncation_are_reported() {
        let raw = "HTTP/1.1 200 OK\r\n\r\ndata: {\"error\":{\"message\":\"context too long\"}}\n\n"
            .to_string();
        let e = parse_stream(response(raw), Instant::now()).unwrap_err();
        assert!(e.to_string().contains("context too long"), "{e}");
        let raw = "HTTP/1.1 200 OK\r\n\r\ndata: {\"choices\":[{\"text\":\"a\"}]}\n\n".to_string();
        let e = parse_stream(response(raw), Instant::now()).unwrap_err();
        assert!(e.to_string().contains("[DONE]"), "{e}");
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:".to_string();
        assert!(parse_stream(response(raw), Instant::now()).is_err());
    }
}
