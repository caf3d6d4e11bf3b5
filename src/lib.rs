//! tcpfwd: a small, fast layer-4 TLS-terminating TCP forwarder.
//!
//! Data flows one way: [`config`] is validated once, [`net`] opens the
//! sockets and accepts, [`proxy`] runs each connection through the [`tls`]
//! handshake and the splice to its backend. [`acme`] and the reloads of
//! [`service`] only swap what connections read; [`app`] wires it together.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod acme;
pub mod app;
pub mod clientca;
pub mod config;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod service;
pub mod tls;

#[cfg(test)]
mod test_alloc;
