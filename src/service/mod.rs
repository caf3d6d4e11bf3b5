//! Living under a service manager: sd_notify and status, SIGHUP reloads,
//! the stop signals, logging and metrics.

pub mod logging;
pub mod metrics;
pub mod notify;
pub mod reload;
pub mod shutdown;
