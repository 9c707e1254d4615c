//! Real servers on loopback for the instrumentations' tests: PostgreSQL and Redis
//! (xtask's, shared with `cargo xtask bench db`), an Apache Kafka broker, and an
//! OpenTelemetry Collector (OTLP receivers with TLS or mTLS, forwarding to the tests' own
//! receiver) with the throwaway certificates it and its clients use.

pub use xtask::certs::TestCerts;
pub use xtask::collector::{Collector, CollectorConfig, Forward, ServerTls, require_collector};
pub use xtask::kafka::{Kafka, require_kafka};
pub use xtask::servers::*;
