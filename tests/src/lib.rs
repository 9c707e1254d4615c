//! Shared helpers for the integration tests live in `xtask` (fixture builds, toolchains).
