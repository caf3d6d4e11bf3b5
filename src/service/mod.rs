//! Living under a service manager: sd_notify and status, SIGHUP reloads,
//! the stop signals, logging, metrics and the control socket.

pub mod control;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod reload;
pub mod shutdown;
