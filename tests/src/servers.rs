//! Real database servers (PostgreSQL, Redis) on loopback: xtask's, shared with
//! `cargo xtask bench db`.

pub use xtask::servers::*;
