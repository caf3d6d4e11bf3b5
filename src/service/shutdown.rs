//! The stop signal: SIGTERM or SIGINT.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Signal handlers installed at start, so a failure shows before serving.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the SIGTERM and SIGINT handlers.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves at the first SIGTERM or SIGINT.
    pub async fn recv(mut self) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stop requested");
    }
}
