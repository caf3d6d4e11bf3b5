//! One connection, start to end: handshake, backend (and the PROXY header it
//! may get first), splice, and its log line.

pub mod forward;
pub mod header;
pub mod revoke;
pub mod routes;
pub mod splice;
