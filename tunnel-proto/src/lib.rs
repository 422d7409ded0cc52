//! tunnel-proto: see README.
pub mod driver;
pub mod mux;
pub mod wire;
