//! Sockets: listening (bound here or passed by systemd), the accept loops and
//! worker threads, outgoing connections, and the few system calls the standard
//! library lacks.

pub mod activation;
pub mod connect;
pub mod listener;
pub mod server;
pub mod sys;
