//! Offsets of the `runtime.g` fields a tracer reads from `R14` (the current g) in a
//! trampoline: the goroutine id, the stack bounds and the M.

use crate::version::GoVersion;

/// Where a [`RuntimeLayout`] came from, so users can tell a verified layout from a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutSource {
    /// The target's own DWARF.
    Dwarf,
    /// The table by Go version (stripped binaries).
    Table,
}

/// Byte offsets into `runtime.g`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeLayout {
    pub stack_lo: u32,
    pub stack_hi: u32,
    pub stackguard0: u32,
    pub m: u32,
    pub goid: u32,
    pub source: LayoutSource,
}

/// `(first release, last release, goid offset)`: 1.23 added `g.syscallbp` (+8), 1.25
/// removed `gobuf.ret` (-8). The other fields have not moved since 1.17. Checked against
/// DWARF of real builds by the test suite for every version in go-versions.toml.
type Release = (u32, u32);
const GOID_BY_RELEASE: &[(Release, Release, u32)] =
    &[((1, 20), (1, 22), 152), ((1, 23), (1, 24), 160), ((1, 25), (1, 27), 152)];

impl RuntimeLayout {
    /// The layout for a Go release, or None when the release is outside the table.
    pub fn for_version(v: &GoVersion) -> Option<Self> {
        let r = v.release();
        GOID_BY_RELEASE.iter().find(|(lo, hi, _)| *lo <= r && r <= *hi).map(|&(_, _, goid)| RuntimeLayout {
            stack_lo: 0,
            stack_hi: 8,
            stackguard0: 16,
            m: 48,
            goid,
            source: LayoutSource::Table,
        })
    }

    /// The releases the table covers, for error messages.
    pub fn table_range() -> (GoVersion, GoVersion) {
        let lo = GOID_BY_RELEASE[0].0;
        let hi = GOID_BY_RELEASE[GOID_BY_RELEASE.len() - 1].1;
        (GoVersion::new(lo.0, lo.1, 0), GoVersion::new(hi.0, hi.1, 0))
    }

    /// Builds the layout from a field-offset lookup over `runtime.g` (`"stack.lo"` names
    /// a field of the embedded `stack` struct).
    pub fn from_fields(offset_of: impl Fn(&str) -> Option<u64>) -> Option<Self> {
        let get = |f: &str| offset_of(f).and_then(|o| u32::try_from(o).ok());
        Some(RuntimeLayout {
            stack_lo: get("stack.lo")?,
            stack_hi: get("stack.hi")?,
            stackguard0: get("stackguard0")?,
            m: get("m")?,
            goid: get("goid")?,
            source: LayoutSource::Dwarf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goid_moves_with_the_release() {
        let goid = |m| RuntimeLayout::for_version(&GoVersion::new(1, m, 3)).map(|l| l.goid);
        assert_eq!(goid(21), Some(152));
        assert_eq!(goid(23), Some(160));
        assert_eq!(goid(24), Some(160));
        assert_eq!(goid(26), Some(152));
        assert_eq!(goid(19), None);
        assert_eq!(goid(28), None);
    }
}
