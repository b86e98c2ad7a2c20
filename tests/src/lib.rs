//! The harness of the end-to-end tests: starts the real `radixkv-server`
//! binary with a settings file in a fresh directory, waits for its READY
//! line, and stops it (SIGTERM for a graceful stop, SIGKILL for a crash).
//!
//! The binary is the one `cargo test --workspace` builds next to the test
//! executables (`target/<profile>/radixkv-server`); `RADIXKV_SERVER_BIN`
//! overrides the path.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use cache_server::client::{Client, Scope};
pub use cache_server::local::LocalClient;

pub mod audit;

/// Tokens per page in these tests.
pub const PAGE: usize = 4;
/// Bytes per block in these tests.
pub const BLOCK: usize = 8192;

/// The server binary under test.
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("RADIXKV_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/radixkv-server
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("a target directory")
        .join("radixkv-server");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p cache-server` (or `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// A running server process and its directory.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    pub dir: PathBuf,
    pub tcp: SocketAddr,
    pub unix: PathBuf,
    /// The local socket (`cache_server::local`).
    pub local: PathBuf,
    pub metrics: SocketAddr,
    config_text: String,
}

/// The settings file the tests start from: small blocks, small tiers, a
/// shared-memory host tier, and the extra TOML given.
pub fn base_config(dir: &Path, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\n\
         metrics_listen = \"127.0.0.1:0\"\n\
         data_dir = \"{dir}\"\n\
         unix_socket = \"{dir}/radixkv.sock\"\n\
         shm_path = \"{dir}/host.shm\"\n\
         page_size = {PAGE}\n\
         block_bytes = {BLOCK}\n\
         layout = \"e2e\"\n\
         host_bytes = {host}\n\
         disk_bytes = {disk}\n\
         vocab_size = {VOCAB}\n\
         {extra}\n",
        dir = dir.display(),
        host = 64 * BLOCK,
        disk = 256 * BLOCK,
    )
}

impl ServerProcess {
    /// Starts a server in a new directory under `root` with `extra` TOML.
    pub fn start(root: &Path, extra: &str) -> ServerProcess {
        let dir = root.join("server");
        std::fs::create_dir_all(&dir).unwrap();
        let text = base_config(&dir, extra);
        Self::start_with(dir, text)
    }

    fn start_with(dir: PathBuf, config_text: String) -> ServerProcess {
        let config = dir.join("radixkv.toml");
        std::fs::write(&config, &config_text).unwrap();
        let mut child = Command::new(server_binary())
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("starting radixkv-server");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(line.starts_with("READY"), "the server said {line:?}");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_string()
        };
        ServerProcess {
            tcp: field("tcp").parse().unwrap(),
            unix: PathBuf::from(field("unix")),
            local: PathBuf::from(field("local")),
            metrics: field("metrics").parse().unwrap(),
            child: Some(child),
            dir,
            config_text,
        }
    }

    /// Starts the same server again (same directory and settings).
    pub fn restart(mut self) -> ServerProcess {
        let (dir, text) = (self.dir.clone(), self.config_text.clone());
        self.child = None;
        Self::start_with(dir, text)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub async fn tcp_client(&self, token: Option<&str>) -> Client {
        Client::connect(&self.tcp.to_string(), token).await.unwrap()
    }

    /// A blocking client of the local socket.
    pub fn local_client(&self, token: Option<&str>) -> LocalClient {
        LocalClient::connect(&self.local, token).unwrap()
    }

    pub async fn unix_client(&self, token: Option<&str>) -> Client {
        Client::connect(&format!("unix:{}", self.unix.display()), token)
            .await
            .unwrap()
    }

    /// Sends `signal` and waits for the process to exit; returns whether it
    /// exited cleanly.
    pub fn stop(&mut self, signal: i32) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful stop (SIGTERM): the server persists its cache.
    pub fn terminate(&mut self) -> bool {
        self.stop(libc::SIGTERM)
    }

    /// A crash (SIGKILL).
    pub fn kill(&mut self) {
        self.stop(libc::SIGKILL);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The Prometheus page.
    pub fn metrics_text(&self) -> String {
        metrics_text(self.metrics)
    }
}

/// The Prometheus page served at `addr`.
pub fn metrics_text(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the sample `series` (name and labels, exactly as the page
/// prints them) on a Prometheus page; panics if it is absent.
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{page}"))
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A prompt of `pages` whole pages that no other prompt id (below 50,000)
/// shares: its first token differs (7919 is prime to the vocabulary size).
pub fn prompt(id: u32, pages: usize) -> Vec<u32> {
    (0..(pages * PAGE) as u32)
        .map(|i| (id * 7919 + i * 31) % VOCAB)
        .collect()
}

/// The vocabulary size the test servers check token ids against.
pub const VOCAB: u32 = 50_000;

/// The block of page `p` of prompt `id`: distinct, checkable bytes.
pub fn block(id: u32, p: usize) -> Vec<u8> {
    let seed = (u64::from(id) << 32 | p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..BLOCK)
        .map(|i| (seed.rotate_left(i as u32 % 64) as u8) ^ i as u8)
        .collect()
}

/// Blocks `pages` of prompt `id`, back to back.
pub fn blocks(id: u32, pages: std::ops::Range<usize>) -> bytes::Bytes {
    pages.flat_map(|p| block(id, p)).collect::<Vec<u8>>().into()
}
