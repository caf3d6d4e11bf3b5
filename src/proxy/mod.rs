//! One connection, start to end: handshake, backend, splice, and its log line.

pub mod forward;
pub mod routes;
pub mod splice;
