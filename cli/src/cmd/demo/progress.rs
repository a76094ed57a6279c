//! Progress lines on standard error while the demo runs (none with `--quiet`), so that the
//! report on standard output stays clean.

use std::time::Instant;

use super::phase::Tally;

/// Prints progress unless quiet.
pub(crate) struct Progress {
    quiet: bool,
    started: Instant,
}

impl Progress {
    /// A printer; `quiet` silences it.
    pub(crate) fn new(quiet: bool) -> Progress {
        Progress { quiet, started: Instant::now() }
    }

    /// One progress line.
    pub(crate) fn line(&self, text: &str) {
        if !self.quiet {
            eprintln!("[{:>5.1}s] {text}", self.started.elapsed().as_secs_f64());
        }
    }

    /// A phase starts.
    pub(crate) fn start(&self, phase: &str) {
        self.line(&format!("{phase}: running"));
    }

    /// A phase ended with these answers.
    pub(crate) fn done(&self, phase: &str, t: &Tally) {
        self.line(&format!(
            "{phase}: {} requests: {} allowed, {} denied, {} throttled, {} rejected",
            t.requests, t.allowed, t.denied, t.throttled, t.rejected
        ));
    }
}
