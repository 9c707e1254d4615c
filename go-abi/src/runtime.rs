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
    /// `runtime.m.p`: the P the thread holds (nil without one).
    pub m_p: u32,
    /// `runtime.p.id`: 0..GOMAXPROCS-1; trampolines pick their sub-ring by it.
    pub p_id: u32,
    pub source: LayoutSource,
}

/// `(first release, last release, g.goid, m.p)`: 1.23 added `g.syscallbp` (+8 to goid);
/// 1.25 removed `gobuf.ret` (-8 to both: a gobuf sits in g and in m); 1.26 added 8 bytes
/// to `m` before `p`. `g.stack`, `g.stackguard0`, `g.m` and `p.id` have not moved since
/// 1.17. Read off DWARF of real builds of every release in go-versions.toml, and checked
/// against DWARF by the test suite.
type Release = (u32, u32);
const BY_RELEASE: &[(Release, Release, u32, u32)] = &[
    ((1, 20), (1, 22), 152, 208),
    ((1, 23), (1, 24), 160, 208),
    ((1, 25), (1, 25), 152, 200),
    ((1, 26), (1, 27), 152, 208),
];

impl RuntimeLayout {
    /// The layout for a Go release, or None when the release is outside the table.
    pub fn for_version(v: &GoVersion) -> Option<Self> {
        let r = v.release();
        BY_RELEASE.iter().find(|(lo, hi, _, _)| *lo <= r && r <= *hi).map(|&(_, _, goid, m_p)| RuntimeLayout {
            stack_lo: 0,
            stack_hi: 8,
            stackguard0: 16,
            m: 48,
            goid,
            m_p,
            p_id: 0,
            source: LayoutSource::Table,
        })
    }

    /// The releases the table covers, for error messages.
    pub fn table_range() -> (GoVersion, GoVersion) {
        let lo = BY_RELEASE[0].0;
        let hi = BY_RELEASE[BY_RELEASE.len() - 1].1;
        (GoVersion::new(lo.0, lo.1, 0), GoVersion::new(hi.0, hi.1, 0))
    }

    /// Builds the layout from a field-offset lookup: `runtime.g` fields by name
    /// (`"stack.lo"` names a field of the embedded `stack` struct), `"m.p"` in
    /// `runtime.m` and `"p.id"` in `runtime.p`.
    pub fn from_fields(offset_of: impl Fn(&str) -> Option<u64>) -> Option<Self> {
        let get = |f: &str| offset_of(f).and_then(|o| u32::try_from(o).ok());
        Some(RuntimeLayout {
            stack_lo: get("stack.lo")?,
            stack_hi: get("stack.hi")?,
            stackguard0: get("stackguard0")?,
            m: get("m")?,
            goid: get("goid")?,
            m_p: get("m.p")?,
            p_id: get("p.id")?,
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
        let m_p = |m| RuntimeLayout::for_version(&GoVersion::new(1, m, 0)).map(|l| l.m_p);
        assert_eq!((m_p(24), m_p(25), m_p(26)), (Some(208), Some(200), Some(208)));
    }
}
