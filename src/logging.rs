//! Log set-up: tracing to standard error, as text or JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => {
            EnvFilter::try_new(&spec).map_err(|e| format!("invalid RUST_LOG '{spec}': {e}"))?
        }
        _ => {
            let level = level.to_ascii_lowercase();
            if !["error", "warn", "info", "debug", "trace", "off"].contains(&level.as_str()) {
                return Err(format!(
                    "invalid --log-level '{level}': use error, warn, info, debug or trace"
                ));
            }
            // Dependencies stay at warn unless asked for through RUST_LOG.
            EnvFilter::try_new(format!("warn,tcpfwd={level}"))
                .map_err(|e| format!("invalid --log-level '{level}': {e}"))?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}
