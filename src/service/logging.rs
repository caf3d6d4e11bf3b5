//! Log set-up: tracing to standard error, as text or JSON lines, or to the
//! journal with native fields when standard error is the journal.

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
/// `format` `None` (not chosen) logs to the journal when systemd connected
/// standard error to it (`JOURNAL_STREAM`), text otherwise.
///
/// The filter is tracing-subscriber's `Targets` (`LEVEL` or `TARGET=LEVEL`,
/// comma-separated) rather than `EnvFilter`, whose regex engine would add
/// about a megabyte to a binary meant for a Raspberry Pi.
pub fn init(level: &str, format: Option<LogFormat>) -> Result<(), String> {
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
    let mut journal_error = None;
    let journal = match format {
        None if stderr_is_journal() => match tracing_journald::layer() {
            // Fields as the log line names them: REASON=, PEER=, ROUTE=...
            Ok(l) => Some(
                l.with_field_prefix(None)
                    .with_syslog_identifier("tcpfwd".into()),
            ),
            Err(e) => {
                journal_error = Some(e);
                None
            }
        },
        _ => None,
    };
    let result = match (journal, format.unwrap_or(LogFormat::Text)) {
        (Some(j), _) => registry.with(j).try_init(),
        (None, LogFormat::Text) => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .try_init(),
        (None, LogFormat::Json) => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))?;
    if let Some(e) = journal_error {
        tracing::warn!("cannot log to the journal natively, logging text to standard error: {e}");
    }
    Ok(())
}

/// Whether standard error is the stream systemd connected to the journal:
/// `JOURNAL_STREAM` ("DEVICE:INODE") names it. A child with a redirected
/// standard error inherits the variable but not the stream, hence the check.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    // fstat(2) on a duplicate of the descriptor, without unsafe code.
    let meta = std::os::fd::AsFd::as_fd(&std::io::stderr())
        .try_clone_to_owned()
        .and_then(|fd| std::fs::File::from(fd).metadata())
        .map(|m| (m.dev(), m.ino()));
    match (var.to_str(), meta) {
        (Some(v), Ok((dev, ino))) => journal_stream_is(v, dev, ino),
        _ => false,
    }
}

/// Whether `JOURNAL_STREAM`'s value names the file `dev`:`ino`.
fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_names_device_and_inode() {
        assert!(journal_stream_is("8:12345", 8, 12345));
        assert!(!journal_stream_is("8:12345", 8, 12346));
        assert!(!journal_stream_is("9:12345", 8, 12345));
        assert!(!journal_stream_is("garbage", 8, 12345));
        assert!(!journal_stream_is("", 0, 0));
    }
}
