//! Durations as people write them: `500ms`, `10s`, `5m`, `1h30m`, `2d`.

use std::fmt;
use std::str::FromStr;

/// A span of time as written on the command line: `500ms`, `10s`, `5m`, `1h30m`, `2d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl FromStr for Duration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid duration '{}': write a number and a unit, like 500ms, 10s, 5m, 1h30m or 2d",
                super::printable(text)
            )
        };
        let s = text.trim();
        if s.is_empty() {
            return Err(bad());
        }
        if s == "0" {
            return Ok(Duration(std::time::Duration::ZERO));
        }
        let mut total_ms: u64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit_ms: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            total_ms = n
                .checked_mul(unit_ms)
                .and_then(|ms| total_ms.checked_add(ms))
                .ok_or_else(bad)?;
        }
        Ok(Duration(std::time::Duration::from_millis(total_ms)))
    }
}

/// In the form the parser reads back: `1h30m`, `1s500ms`, `0`. A span with
/// a part finer than a millisecond (never parsed, only computed) is shown as
/// std's `Debug` does (`1.5µs`).
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_nanos() % 1_000_000 != 0 {
            return write!(f, "{:?}", self.0);
        }
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0");
        }
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        if ms > 0 {
            write!(f, "{ms}ms")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s: &str| s.parse::<Duration>().map(|d| d.0.as_millis());
        assert_eq!(d("500ms"), Ok(500));
        assert_eq!(d("10s"), Ok(10_000));
        assert_eq!(d("5m"), Ok(300_000));
        assert_eq!(d("1h30m"), Ok(5_400_000));
        assert_eq!(d("2d"), Ok(172_800_000));
        assert_eq!(d("0"), Ok(0));
        for bad in [
            "",
            "10",
            "s",
            "10x",
            "1.5s",
            "-1s",
            "99999999999999999999d",
            "+5s",
        ] {
            let e = d(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    /// Found by tests/fuzz_parsers.rs: `Display` printed std's `Debug`
    /// (`1.5s`, `1.001s`), which the parser refuses.
    #[test]
    fn display_reads_back() {
        for ms in [
            0, 1, 999, 1_000, 1_500, 1_001, 60_000, 5_400_000, 90_061_001,
        ] {
            let d = Duration(std::time::Duration::from_millis(ms));
            assert_eq!(d.to_string().parse::<Duration>(), Ok(d), "{d}");
        }
        let d = |ms| Duration(std::time::Duration::from_millis(ms)).to_string();
        assert_eq!(d(5_400_000), "1h30m");
        assert_eq!(d(1_500), "1s500ms");
        assert_eq!(d(172_800_000), "2d");
        assert_eq!(d(0), "0");
        let e = "5\ns".parse::<Duration>().unwrap_err();
        assert!(e.starts_with("invalid duration '5\\ns'"), "{e}");
    }
}
