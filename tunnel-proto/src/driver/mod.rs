//! The tokio driver.
pub mod acceptor;
pub mod connector;
