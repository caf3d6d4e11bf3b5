//! Open connections made with a client certificate, by the CA that accepted
//! it, so that a revocation can close them (video streams last for hours).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateRevocationListDer;
use tokio::sync::Notify;

use crate::config::ClientAuth;
use crate::policy::Serial;
use crate::tls::client_auth::is_revoked;

/// The live client-certificate connections.
#[derive(Debug, Default)]
pub struct Revocations {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
}

#[derive(Debug)]
struct Live {
    auth: ClientAuth,
    serial: Held,
    notify: Arc<Notify>,
}

/// A serial, kept by value when it fits (any RFC 5280 one does) and on the
/// heap only when a CA issued a longer one.
#[derive(Debug)]
enum Held {
    Inline(Serial),
    Long(Box<[u8]>),
}

impl Held {
    fn new(serial: &[u8]) -> Held {
        match Serial::new(serial) {
            Some(s) => Held::Inline(s),
            None => Held::Long(serial.into()),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Held::Inline(s) => s.as_slice(),
            Held::Long(b) => b,
        }
    }
}

/// One connection's entry; dropping it (the connection's end) removes it.
pub struct Registration {
    id: u64,
    registry: Arc<Revocations>,
    /// Notified once the certificate is revoked.
    pub revoked: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Revocations {
    /// An empty registry.
    pub fn new() -> Arc<Revocations> {
        Arc::new(Revocations::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        // A panic elsewhere while holding it leaves a map that is still whole.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection whose certificate (`serial`) `auth` accepted.
    pub fn register(self: &Arc<Self>, auth: &ClientAuth, serial: &[u8]) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.lock().insert(
            id,
            Live {
                auth: auth.clone(),
                serial: Held::new(serial),
                notify: notify.clone(),
            },
        );
        Registration {
            id,
            registry: self.clone(),
            revoked: notify,
        }
    }

    /// Tells every connection accepted by `auth` whose serial `crls` lists
    /// to close; returns how many.
    pub fn close_revoked(
        &self,
        auth: &ClientAuth,
        crls: &[CertificateRevocationListDer<'_>],
    ) -> usize {
        let live = self.lock();
        let mut n = 0;
        for l in live.values() {
            if &l.auth == auth && is_revoked(crls, l.serial.as_slice()) {
                // notify_one keeps a permit: a task not yet waiting still sees it.
                l.notify.notify_one();
                n += 1;
            }
        }
        n
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
