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

/// A standard-library field offset (`"runtime.g.goid"`, `"net/http.Request.ctx"`) for a
/// Go release, from the generated table ([`crate::offsets`]); None outside the table or
/// for a field that release does not have. Only the release's own row answers: the
/// runtime moves fields between releases, so a neighbour's offsets would be a guess.
/// Examples of what moves: 1.23 added `g.syscallbp` (+8 to goid) and `Request.Pattern`
/// (+16 to `Request.ctx`); 1.25 removed `gobuf.ret` (-8 to goid and `m.p`); 1.26 added
/// 8 bytes to `m` before `p`.
pub fn table_offset(release: (u32, u32), field: &str) -> Option<u64> {
    let row = std_rows().find(|r| (r.from.0, r.from.1) == release)?;
    row_offset(row, field)
}

/// A library field offset (`"google.golang.org/grpc.ClientConn.target"`) for a version of
/// its module (`"v1.60.1"`, as build info records it), from the generated table: the row
/// whose range holds the version. A row covers the minor series of the version it was
/// read from, from that patch on (or, for a module offset-tool/modules.toml marks
/// `lower_row`, up to the next listed version). None outside every row, or for a field
/// the row lacks: no offset rather than a guess.
/// Pre-release and pseudo-version suffixes are ignored (`v1.60.0-dev` counts as v1.60.0).
/// `std` is not a module here: its rows are keyed by Go release ([`table_offset`]).
pub fn module_offset(module: &str, version: &str, field: &str) -> Option<u64> {
    module_offset_in(crate::offsets::TABLE, module, version, field)
}

fn module_offset_in(table: &[crate::offsets::Row], module: &str, version: &str, field: &str) -> Option<u64> {
    let v = module_version(version).filter(|_| module != "std")?;
    let row = table.iter().find(|r| r.module == module && r.from <= v && v < r.until)?;
    row_offset(row, field)
}

fn std_rows() -> impl Iterator<Item = &'static crate::offsets::Row> {
    crate::offsets::TABLE.iter().filter(|r| r.module == "std")
}

fn row_offset(row: &crate::offsets::Row, field: &str) -> Option<u64> {
    row.fields.iter().find(|(name, _)| *name == field).map(|&(_, offset)| offset)
}

/// `v1.60.1` (or `v1.60.1-pre`, `v1.60.1+incompatible`) as (1, 60, 1).
fn module_version(version: &str) -> Option<(u32, u32, u32)> {
    let v = version.strip_prefix('v')?;
    let end = v.find(['-', '+']).unwrap_or(v.len());
    let mut parts = v[..end].split('.').map(|p| p.parse::<u32>().ok());
    let triple = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(triple)
}

/// Field offsets (`"net/http.Request.Header"`) of one binary: from its DWARF when it has
/// the struct, else from the generated table: `std` fields by `release`, library fields
/// by the version of their module the binary was built with ([`Self::with_modules`]).
/// Struct layouts read from DWARF are kept for the next field.
pub struct FieldOffsets<'d> {
    dwarf: Option<&'d crate::dwarf::DwarfInfo>,
    release: (u32, u32),
    /// (module path, version) of the binary's dependencies.
    modules: Vec<(String, String)>,
    structs: std::collections::HashMap<String, Option<crate::dwarf::StructLayout>>,
}

impl<'d> FieldOffsets<'d> {
    pub fn new(dwarf: Option<&'d crate::dwarf::DwarfInfo>, release: (u32, u32)) -> Self {
        FieldOffsets { dwarf, release, modules: Vec::new(), structs: std::collections::HashMap::new() }
    }

    /// The dependencies of the binary (its build info's `deps`), so that library fields
    /// can come from the table too. A dependency replaced by another module version counts
    /// as that version; one replaced by a local directory has no version and is skipped.
    pub fn with_modules(mut self, deps: &[crate::buildinfo::Module]) -> Self {
        self.modules = deps
            .iter()
            .map(|m| m.replace.as_deref().unwrap_or(m))
            .filter(|m| !m.version.is_empty())
            .map(|m| (m.path.clone(), m.version.clone()))
            .collect();
        self
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
        table_offset(self.release, key).or_else(|| {
            // The module owning the key: the longest dependency path the key's package is in.
            let owner = self
                .modules
                .iter()
                .filter(|(path, _)| key.strip_prefix(path.as_str()).is_some_and(|rest| rest.starts_with(['.', '/'])))
                .max_by_key(|(path, _)| path.len())?;
            if crate::offsets::TABLE.iter().any(|r| r.module == owner.0) {
                return module_offset(&owner.0, &owner.1, key);
            }
            // A module without rows of its own (genproto's status message) is read in the
            // rows of the library that requires it.
            self.modules.iter().find_map(|(path, version)| module_offset(path, version, key))
        })
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
        let first = std_rows().next().map_or((1, 21, 0), |r| r.from);
        let last = std_rows().last().map_or(first, |r| r.from);
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

    #[test]
    fn std_fields_need_their_own_release() {
        assert_eq!(table_offset((1, 21), "net/http.Request.Method"), Some(0));
        assert_eq!(table_offset((1, 21), "net/http.Request.Pattern"), None, "added in 1.23");
        assert!(table_offset((1, 23), "net/http.Request.Pattern").is_some());
        assert_eq!(table_offset((1, 20), "net/http.Request.Method"), None);
        assert_eq!(table_offset((1, 21), "net/http.Request.NoSuchField"), None);
        let (lo, hi) = RuntimeLayout::table_range();
        assert_eq!((lo.major, lo.minor), (1, 21));
        assert!(hi.minor >= 27);
    }

    const SYNTHETIC: &[crate::offsets::Row] = &[
        crate::offsets::Row {
            module: "example.com/lib",
            from: (1, 2, 0),
            until: (1, 5, 3),
            generator: "go1.21.13",
            fields: &[("example.com/lib.T.a", 8), ("example.com/lib.T.gone", 16)],
        },
        crate::offsets::Row {
            module: "example.com/lib",
            from: (1, 5, 3),
            until: (1, 6, 0),
            generator: "go1.27.3",
            fields: &[("example.com/lib.T.a", 24)],
        },
    ];

    #[test]
    fn module_versions_use_the_nearest_lower_listed_row() {
        let at = |v| module_offset_in(SYNTHETIC, "example.com/lib", v, "example.com/lib.T.a");
        assert_eq!(at("v1.1.9"), None, "before the first listed version");
        assert_eq!(at("v1.2.0"), Some(8));
        assert_eq!(at("v1.4.7"), Some(8), "between two listed versions: the lower one");
        assert_eq!(at("v1.5.3"), Some(24));
        assert_eq!(at("v1.5.9"), Some(24), "a later patch of the last listed version");
        assert_eq!(at("v1.6.0"), None, "past the minor series of the last listed version");
        assert_eq!(at("v1.5.3-rc.1"), Some(24), "suffixes are ignored");
        assert_eq!(at("v0.0.0-20240101000000-abcdefabcdef"), None);
        assert_eq!(at("1.5.3"), None, "module versions start with v");
        assert_eq!(at("v1.5"), None);
        assert_eq!(module_offset_in(SYNTHETIC, "example.com/lib", "v1.5.3", "example.com/lib.T.gone"), None);
        assert_eq!(module_offset_in(SYNTHETIC, "example.com/other", "v1.5.3", "example.com/lib.T.a"), None);
    }

    #[test]
    fn field_offsets_fall_back_to_the_module_version_of_the_binary() {
        let dep = |path: &str, version: &str| crate::buildinfo::Module {
            path: path.into(),
            version: version.into(),
            sum: String::new(),
            replace: None,
        };
        let mut replaced = dep("google.golang.org/grpc", "v1.0.0");
        replaced.replace = Some(Box::new(dep("google.golang.org/grpc", "v1.60.1")));
        let mut offsets =
            FieldOffsets::new(None, (1, 21)).with_modules(&[dep("google.golang.org/grpc/x", "v9.0.0"), replaced]);
        let key = "google.golang.org/grpc.ClientConn.target";
        assert_eq!(offsets.get(key), module_offset("google.golang.org/grpc", "v1.60.1", key));
        assert!(offsets.get(key).is_some());
        assert_eq!(offsets.get("runtime.g.goid"), Some(152));
        assert_eq!(FieldOffsets::new(None, (1, 21)).get(key), None, "no module version known");
    }

    #[test]
    fn grpc_rows_are_looked_up_by_module_version() {
        let grpc = "google.golang.org/grpc";
        let method = "google.golang.org/grpc/internal/transport.Stream.method";
        let server_st = "google.golang.org/grpc/internal/transport.ServerStream.st";
        assert!(module_offset(grpc, "v1.60.1", method).is_some());
        assert_eq!(module_offset(grpc, "v1.59.0", method), None, "before the first listed version");
        assert!(module_offset(grpc, "v1.70.0", method).is_some(), "every minor release has its row");
        assert_eq!(module_offset(grpc, "v1.69.0", method), None, "a patch before the one read has none");
        assert_eq!(module_offset(grpc, "v1.86.0", method), None, "past the last minor series");
        assert_eq!(module_offset(grpc, "v1.64.1", server_st), None, "one Stream type before the split");
        assert!(module_offset(grpc, "v1.85.0", server_st).is_some());
        assert_eq!(module_offset("std", "v1.21.0", "runtime.g.goid"), None, "std is keyed by Go release");
    }
}
