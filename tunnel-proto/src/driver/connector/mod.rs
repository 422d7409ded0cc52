//! Client connector (owned by the connector work).
