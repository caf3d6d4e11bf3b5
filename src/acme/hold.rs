//! The hold after the CA issued a certificate tcpfwd could not use: kept in
//! the state directory, so that a restart does not order again at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The file in the CA's sub-directory.
pub const HOLD_FILE: &str = "hold.json";

/// No orders until `until`, for this set of identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Unix seconds; ordering is allowed again from then.
    pub until: u64,
    /// The identifiers (DNS names and IP addresses, as text) it is for: a
    /// configuration with other names lifts it, since the CA's duplicate limit
    /// counts per exact set of names.
    pub names: Vec<String>,
    /// What was wrong, for the log after a restart.
    pub problem: String,
}

impl Hold {
    /// A hold of `wait` from now.
    pub fn new(wait: Duration, names: Vec<String>, problem: String) -> Hold {
        let until = SystemTime::now()
            .checked_add(wait)
            .unwrap_or_else(SystemTime::now)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Hold {
            until,
            names,
            problem,
        }
    }

    /// When it ends.
    pub fn until(&self) -> SystemTime {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(self.until))
            .unwrap_or(UNIX_EPOCH)
    }

    /// Whether it is for exactly these identifiers (in any order).
    pub fn is_for(&self, names: &[String]) -> bool {
        let mut a = self.names.clone();
        let mut b = names.to_vec();
        a.sort();
        b.sort();
        a == b
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing strings and an integer cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Reads the file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Hold, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a hold file ({e})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_round_trips_and_knows_its_names() {
        let h = Hold::new(
            Duration::from_secs(3600),
            vec!["b.test".into(), "203.0.113.7".into()],
            "bad chain".into(),
        );
        let back = Hold::from_bytes(&h.to_bytes()).unwrap();
        assert_eq!(back, h);
        assert!(back.is_for(&["203.0.113.7".into(), "b.test".into()]));
        assert!(!back.is_for(&["b.test".into()]));
        let left = back.until().duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));
        assert!(Hold::from_bytes(b"{").is_err());
    }
}
