//! Server acceptor (owned by the connector work).
