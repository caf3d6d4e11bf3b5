//! The state directory: a lock against a second tcpfwd, and files written atomically with mode 0600.
//!
//! Layout: `<state-dir>/lock`, and one sub-directory per ACME CA (named after
//! its directory URL) holding `account.json`, `pair.pem` and (after an unusable
//! certificate) `hold.json`, so that switching from staging to production never
//! serves a staging certificate.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

/// An open, locked state directory for one CA.
#[derive(Debug)]
pub struct StateDir {
    /// The CA's sub-directory, where the files live.
    dir: PathBuf,
    /// Holds the flock for as long as tcpfwd runs.
    _lock: File,
}

/// The sub-directory name for a directory URL: host, port and path, with
/// anything but letters, digits, '.' and '-' turned into '_'.
pub fn ca_dir_name(directory_url: &str) -> String {
    let rest = directory_url
        .split_once("://")
        .map_or(directory_url, |(_, r)| r);
    let name: String = rest
        .trim_end_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("ca{name}")
    } else {
        name
    }
}

/// Creates `path` (and parents) with mode 0700. An existing directory is
/// tightened to 0700 only if `tighten` (never a directory the user named,
/// which might be shared, like /tmp); otherwise a loose mode is only reported.
fn ensure_private_dir(path: &Path, tighten: bool) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| {
            format!(
                "cannot create the state directory {}; create it for tcpfwd's user or choose another with --state-dir",
                path.display()
            )
        })?;
    let meta = fs::metadata(path)
        .with_context(|| format!("cannot read the state directory {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        if !tighten {
            tracing::debug!(
                dir = %path.display(),
                mode = format!("{mode:o}"),
                "the state directory is open to others; the ACME files are kept in a 0700 sub-directory"
            );
        } else if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o700)) {
            tracing::warn!(
                dir = %path.display(),
                "the state directory is readable by others and cannot be made private: {e}"
            );
        }
    }
    Ok(())
}

impl StateDir {
    /// Creates and locks `root`, and opens the sub-directory for `directory_url`.
    ///
    /// A second tcpfwd on the same `root` is refused: both would order
    /// certificates and overwrite each other's files.
    pub fn open(root: &Path, directory_url: &str) -> anyhow::Result<StateDir> {
        ensure_private_dir(root, false)?;
        let lock_path = root.join("lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| {
                format!(
                    "cannot open the lock file {}; check that tcpfwd's user owns the state directory",
                    lock_path.display()
                )
            })?;
        if !crate::net::sys::try_lock_exclusive(&lock)
            .with_context(|| format!("cannot lock {}", lock_path.display()))?
        {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            anyhow::bail!(
                "the state directory {} is in use by another tcpfwd{who}; give each tcpfwd its own --state-dir",
                root.display()
            );
        }
        // Best effort: the pid only helps the message above.
        let _ = lock.set_len(0);
        let _ = writeln!(lock, "{}", std::process::id());
        let dir = root.join(ca_dir_name(directory_url));
        ensure_private_dir(&dir, true)?;
        Ok(StateDir { dir, _lock: lock })
    }

    /// The path of a file in the CA's sub-directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads a file; `None` if it does not exist.
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.path(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces a file atomically: temp file (0600), fsync, rename, fsync the directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        write_atomic(&self.dir, name, bytes)
    }

    /// Renames a file to `<name>.<why>-<unix time>` and returns the new path; never deletes.
    pub fn move_aside(&self, name: &str, why: &str) -> io::Result<PathBuf> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let to = self.path(&format!("{name}.{why}-{secs}"));
        fs::rename(self.path(name), &to)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(to)
    }
}

impl StateDir {
    /// Renames `from` to `to` (replacing it) and makes the rename durable.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.path(from), self.path(to))?;
        File::open(&self.dir)?.sync_all()
    }

    /// [`StateDir::write`] on the blocking pool: the fsyncs must not stall
    /// an event loop that also serves connections.
    pub async fn write_blocking(self: &Arc<Self>, name: &str, bytes: Vec<u8>) -> io::Result<()> {
        let (me, name) = (self.clone(), name.to_string());
        blocking(move || me.write(&name, &bytes)).await
    }

    /// On the blocking pool: removes a file (gone already is fine) and makes that durable.
    pub async fn remove_blocking(self: &Arc<Self>, name: &str) -> io::Result<()> {
        let (me, name) = (self.clone(), name.to_string());
        blocking(move || {
            match fs::remove_file(me.path(&name)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                other => other?,
            }
            File::open(&me.dir)?.sync_all()
        })
        .await
    }

    /// [`StateDir::move_aside`] on the blocking pool.
    pub async fn move_aside_blocking(
        self: &Arc<Self>,
        name: &str,
        why: &str,
    ) -> io::Result<PathBuf> {
        let (me, name, why) = (self.clone(), name.to_string(), why.to_string());
        blocking(move || me.move_aside(&name, &why)).await
    }

    /// On the blocking pool: renames `from` to `to`, then removes `obsolete`
    /// files (the older layout), which `to` now supersedes.
    pub async fn promote_blocking(
        self: &Arc<Self>,
        from: &str,
        to: &str,
        obsolete: &[&str],
    ) -> io::Result<()> {
        let me = self.clone();
        let (from, to) = (from.to_string(), to.to_string());
        let obsolete: Vec<String> = obsolete.iter().map(|s| s.to_string()).collect();
        blocking(move || {
            me.rename(&from, &to)?;
            for name in &obsolete {
                match fs::remove_file(me.path(name)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            File::open(&me.dir)?.sync_all()
        })
        .await
    }
}

/// Runs file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("the file task failed: {e}"))))
}

/// Writes `dir/name` so that a crash leaves either the old or the new content.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // The mode above only applies to a new file; a stale temp file keeps its own.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dir.join(name))?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tcpfwd-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ca_dir_names() {
        assert_eq!(
            ca_dir_name("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(
            ca_dir_name("https://127.0.0.1:14000/dir"),
            "127.0.0.1_14000_dir"
        );
        assert_eq!(ca_dir_name("https://../"), "ca..");
    }

    #[test]
    fn files_are_private_atomic_and_locked() {
        let root = tempdir("lock");
        let s = StateDir::open(&root, "https://ca.test/dir").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&s.path("")), 0o700);
        s.write("a", b"one").unwrap();
        s.write("a", b"two").unwrap();
        assert_eq!(s.read("a").unwrap().unwrap(), b"two");
        assert_eq!(
            fs::metadata(s.path("a")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(s.read("missing").unwrap().is_none());
        let err = StateDir::open(&root, "https://ca.test/dir").unwrap_err();
        assert!(
            err.to_string().contains("in use by another tcpfwd"),
            "{err}"
        );
        let aside = s.move_aside("a", "corrupt").unwrap();
        assert!(aside.exists() && s.read("a").unwrap().is_none());
        drop(s);
        // An existing, shared directory keeps its mode; the CA's sub-directory is 0700.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("ca.test_dir"), fs::Permissions::from_mode(0o755)).unwrap();
        let s = StateDir::open(&root, "https://ca.test/dir").unwrap();
        assert_eq!(mode(&root), 0o755);
        assert_eq!(mode(&s.path("")), 0o700);
        fs::remove_dir_all(&root).unwrap();
    }
}
