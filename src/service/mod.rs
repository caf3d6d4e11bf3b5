//! Living under a service manager: sd_notify and status, SIGHUP reloads,
//! the stop signals, and logging.

pub mod logging;
pub mod notify;
pub mod reload;
pub mod shutdown;
