//! Real servers on loopback for the instrumentations' tests: PostgreSQL and Redis
//! (xtask's, shared with `cargo xtask bench db`) and an Apache Kafka broker.

pub use xtask::kafka::{Kafka, require_kafka};
pub use xtask::servers::*;
