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

/// A field offset (`"runtime.g.goid"`, `"net/http.Request.ctx"`) for a Go release, from
/// the generated table ([`crate::offsets`]); None outside the table or for a field that
/// release does not have. Examples of what moves: 1.23 added `g.syscallbp` (+8 to goid)
/// and `Request.Pattern` (+16 to `Request.ctx`); 1.25 removed `gobuf.ret` (-8 to goid and
/// `m.p`); 1.26 added 8 bytes to `m` before `p`.
pub fn table_offset(release: (u32, u32), field: &str) -> Option<u64> {
    let (_, _, row) = crate::offsets::TABLE.iter().find(|(r, _, _)| *r == release)?;
    row.iter().find(|(name, _)| *name == field).map(|&(_, offset)| offset)
}

/// Field offsets (`"net/http.Request.Header"`) of one binary: from its DWARF when it has
/// the struct, else from the generated table for `release`. Struct layouts read from DWARF
/// are kept for the next field.
pub struct FieldOffsets<'d> {
    dwarf: Option<&'d crate::dwarf::DwarfInfo>,
    release: (u32, u32),
    structs: std::collections::HashMap<String, Option<crate::dwarf::StructLayout>>,
}

impl<'d> FieldOffsets<'d> {
    pub fn new(dwarf: Option<&'d crate::dwarf::DwarfInfo>, release: (u32, u32)) -> Self {
        FieldOffsets { dwarf, release, structs: std::collections::HashMap::new() }
    }

    /// The offset of `struct.field`, or None when neither source has it.
    pub fn get(&mut self, key: &str) -> Option<u64> {
        let (strukt, field) = key.rsplit_once('.')?;
        if let Some(d) = self.dwarf {
            let layout =
                self.structs.entry(strukt.to_string()).or_insert_with(|| d.struct_layout(strukt).ok().flatten());
            if let Some(l) = layout {
                return l.fields.iter().find(|f| f.name == field).map(|f| f.offset);
            }
        }
        table_offset(self.release, key)
    }
}

impl RuntimeLayout {
    /// The layout for a Go release, or None when the release is outside the table.
    pub fn for_version(v: &GoVersion) -> Option<Self> {
        let r = v.release();
        let mut layout = Self::from_fields(|f| match f {
            "m.p" => table_offset(r, "runtime.m.p"),
            "p.id" => table_offset(r, "runtime.p.id"),
            f => table_offset(r, &format!("runtime.g.{f}")),
        })?;
        layout.source = LayoutSource::Table;
        Some(layout)
    }

    /// The releases the table covers, for error messages.
    pub fn table_range() -> (GoVersion, GoVersion) {
        let first = crate::offsets::TABLE.first().map_or((1, 21), |t| t.0);
        let last = crate::offsets::TABLE.last().map_or((1, 21), |t| t.0);
        (GoVersion::new(first.0, first.1, 0), GoVersion::new(last.0, last.1, 0))
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
        assert_eq!(goid(20), None, "go1.20 is outside go-versions.toml, so outside the table");
        assert_eq!(goid(28), None);
        let m_p = |m| RuntimeLayout::for_version(&GoVersion::new(1, m, 0)).map(|l| l.m_p);
        assert_eq!((m_p(24), m_p(25), m_p(26)), (Some(208), Some(200), Some(208)));
    }
}
