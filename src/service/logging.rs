//! Log set-up: tracing to standard error, as text or JSON lines.

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
///
/// The filter is tracing-subscriber's `Targets` (`LEVEL` or `TARGET=LEVEL`,
/// comma-separated) rather than `EnvFilter`, whose regex engine would add
/// about a megabyte to a binary meant for a Raspberry Pi.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => Targets::from_str(&spec).map_err(|e| {
            format!("invalid RUST_LOG '{spec}': {e}; write a level (info) or TARGET=LEVEL pairs (warn,tcpfwd=debug)")
        })?,
        _ => {
            let level = level.to_ascii_lowercase();
            if !["error", "warn", "info", "debug", "trace", "off"].contains(&level.as_str()) {
                return Err(format!(
                    "invalid --log-level '{level}': use error, warn, info, debug or trace"
                ));
            }
            // Dependencies stay at warn unless asked for through RUST_LOG.
            Targets::from_str(&format!("warn,tcpfwd={level}"))
                .map_err(|e| format!("invalid --log-level '{level}': {e}"))?
        }
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}
