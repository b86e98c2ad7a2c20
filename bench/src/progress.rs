//! A one-line progress indicator on stderr, shown only when stderr is a
//! terminal (logs and CI output stay clean), at most ten times a second.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    shown: bool,
    last: Option<Instant>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        Self {
            enabled: std::io::stderr().is_terminal(),
            shown: false,
            last: None,
        }
    }

    /// Replaces the line with `line()` unless it was updated under 100 ms ago.
    pub fn show(&mut self, line: impl FnOnce() -> String) {
        if !self.enabled
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        self.shown = true;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", line());
        let _ = err.flush();
    }

    /// Erases the line.
    pub fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[2K");
            self.shown = false;
        }
    }
}
