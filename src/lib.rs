//! tcpfwd: a small, fast layer-4 TLS-terminating TCP forwarder.
//!
//! Data flows one way: [`config`] is validated once, [`listener`] opens the
//! sockets, [`server`] accepts, [`forward`] runs each connection through the
//! [`tls`] handshake (driven by [`tls_conn`]) and the [`splice`].
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod acme;
pub mod activation;
pub mod app;
pub mod cli;
pub mod config;
pub mod forward;
pub mod listener;
pub mod logging;
pub mod notify;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod splice;
pub mod state;
pub mod sys;
pub mod tls;
pub mod tls_conn;
pub mod x509;
