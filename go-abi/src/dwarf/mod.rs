//! Function signatures, parameter locations and struct layouts from a Go binary's DWARF.
//!
//! Go writes DWARF 4 (before 1.25) or DWARF 5, compressed by default. Types live in one
//! unit and are referenced across units, and Go classifies each type with its own
//! `DW_AT_go_kind` attribute (the `reflect.Kind` number), which is what we trust over the
//! DWARF tag: Go describes maps, channels and funcs as typedefs of pointers, strings and
//! slices as structs.
//!
//! Use DWARF for names and types and [`abi::assign`] for where values are: checked against
//! the compiler's register assignment (`tests/abi_dwarf.rs`, Go 1.21 to 1.27), Go's
//! locations at entry are right for most parameters but not all of them:
//! - a register argument whose address is taken (and in 1.27 also an unused, unnamed or
//!   `.dict` one) is located in its spill slot, which is not written yet at entry;
//! - a stack argument of which only one word is used is located at that word, with no
//!   `DW_OP_piece`;
//! - a parameter reassigned from another one can carry the other's location;
//! - Go 1.21 leaves blank and unnamed parameters and wrapper receivers out of the list
//!   altogether, so compare [`abi::Assignment::arg_frame_size`] with the pclntab's
//!   argument size before trusting a parameter list.
//!
//! Everything about functions is read once at load; types are resolved once per distinct
//! type and shared. Struct layouts and locations are read on demand from the kept sections.

use std::collections::HashMap;
use std::sync::Arc;

use gimli::{
    AttributeValue, DebugAddrBase, DebugInfoOffset, DebugLocListsBase, DebugRngListsBase, DebugStrOffsetsBase,
    DebuggingInformationEntry, EndianSlice, Operation, RunTimeEndian, UnitOffset,
};
use object::{Object, ObjectSection};

use crate::abi::{self, GoType, PointerKind, StructType};

mod location;
mod shape;
mod types;

pub use shape::{MAX_FIELDS, Shape, ShapeField};

#[cfg(test)]
use location::evaluate;
use location::location_at;
use types::TypeReader;

type Slice<'a> = EndianSlice<'a, RunTimeEndian>;
type Dwarf<'a> = gimli::Dwarf<Slice<'a>>;
type Unit<'a> = gimli::Unit<Slice<'a>>;
type Entry<'a> = DebuggingInformationEntry<Slice<'a>>;

/// Go's vendor attributes (`cmd/internal/dwarf`).
const DW_AT_GO_KIND: gimli::DwAt = gimli::DwAt(0x2900);

/// Deepest type nesting (and typedef chain) we follow; Go's real types stay far below it,
/// and it stops cycles in corrupt input.
const MAX_TYPE_DEPTH: u32 = 64;
/// Longest `DW_AT_abstract_origin` chain we follow (Go uses one level).
const MAX_ORIGIN_DEPTH: u32 = 4;
/// The name Go 1.27 gives the hidden dictionary parameter of shape-instantiated code.
const DICT_PARAM: &str = ".dict";

/// `reflect.Kind` values as Go writes them in `DW_AT_go_kind`.
mod kind {
    pub const BOOL: u64 = 1;
    pub const INT: u64 = 2;
    pub const INT8: u64 = 3;
    pub const INT16: u64 = 4;
    pub const INT32: u64 = 5;
    pub const INT64: u64 = 6;
    pub const UINT: u64 = 7;
    pub const UINT8: u64 = 8;
    pub const UINT16: u64 = 9;
    pub const UINT32: u64 = 10;
    pub const UINT64: u64 = 11;
    pub const UINTPTR: u64 = 12;
    pub const FLOAT32: u64 = 13;
    pub const FLOAT64: u64 = 14;
    pub const COMPLEX64: u64 = 15;
    pub const COMPLEX128: u64 = 16;
    pub const ARRAY: u64 = 17;
    pub const CHAN: u64 = 18;
    pub const FUNC: u64 = 19;
    pub const INTERFACE: u64 = 20;
    pub const MAP: u64 = 21;
    pub const POINTER: u64 = 22;
    pub const SLICE: u64 = 23;
    pub const STRING: u64 = 24;
    pub const STRUCT: u64 = 25;
    pub const UNSAFE_POINTER: u64 = 26;
}

#[derive(Debug, thiserror::Error)]
pub enum DwarfError {
    #[error("cannot read section {section}: {source}")]
    Section { section: &'static str, source: object::Error },
    #[error("malformed dwarf in {what}: {source}")]
    Malformed { what: &'static str, source: gimli::Error },
    #[error("no compilation unit contains .debug_info offset {offset:#x}")]
    NoUnit { offset: usize },
    #[error("dwarf entry at .debug_info offset {offset:#x} is not a usable {what}")]
    BadEntry { offset: usize, what: &'static str },
}

fn malformed(what: &'static str) -> impl FnOnce(gimli::Error) -> DwarfError {
    move |source| DwarfError::Malformed { what, source }
}

/// One subprogram with code (`DW_AT_low_pc`), in its declared parameter order.
#[derive(Clone, Debug)]
pub struct FuncDebug {
    pub name: String,
    pub low_pc: u64,
    pub high_pc: u64,
    pub decl_file: Option<Arc<str>>,
    pub decl_line: Option<u64>,
    /// Receiver, parameters and results in declaration order, as DWARF lists them.
    /// Unnamed ones are `~p0`, `~r0`...; Go 1.21 leaves blank and unnamed parameters and
    /// the `.this` receiver of wrappers out, so the list can be incomplete there.
    pub params: Vec<ParamDebug>,
    /// Marked `DW_AT_trampoline`: a compiler-generated wrapper (pointer-receiver wrappers
    /// and the like).
    pub is_wrapper: bool,
    unit: usize,
    frame_base_is_cfa: bool,
}

#[derive(Clone, Debug)]
pub struct ParamDebug {
    pub name: String,
    /// The Go spelling of the type (`string`, `[]uint8`, `*main.Store`, `map[string]int`).
    pub type_name: Arc<str>,
    /// `None` when the type could not be resolved (corrupt or unknown DWARF).
    pub ty: Option<Arc<GoType>>,
    /// Go marks results with `DW_AT_variable_parameter`.
    pub is_result: bool,
    die: usize,
}

impl FuncDebug {
    /// Go compiles generic code once per GC shape (`main.F[go.shape.int]`) and passes a
    /// dictionary pointer as the first parameter, after the receiver of a method. Go 1.27
    /// lists it in DWARF as `.dict`; older versions leave it out. This is its index among
    /// the inputs either way. Closures inside such functions capture the dictionary
    /// instead, so they take none.
    pub fn dictionary_index(&self) -> Option<usize> {
        if let Some(listed) = self.params.iter().filter(|p| !p.is_result).position(|p| p.name == DICT_PARAM) {
            return Some(listed);
        }
        // Equality and hash functions of shaped types (`type:.eq.T[go.shape...]`) are
        // plain functions.
        if self.name.starts_with("type:") {
            return None;
        }
        let open = self.name.find("[go.shape.")?;
        let close = matching_bracket(&self.name, open)?;
        // A method of a generic type: `pkg.(*T[shape]).M` or `pkg.T[shape].M`.
        let tail = self.name[close + 1..].trim_start_matches(')');
        let mut segments = tail.split('.').filter(|s| !s.is_empty());
        match (segments.next(), segments.next()) {
            (None, _) => Some(0),
            // `-fm` marks a method value wrapper, a closure over the receiver.
            (Some(method), None) if !is_closure(method) && !method.ends_with("-fm") => Some(1),
            _ => None,
        }
    }

    pub fn has_dictionary(&self) -> bool {
        self.dictionary_index().is_some()
    }

    /// Types of everything passed in: receiver, dictionary (when there is one, listed in
    /// DWARF or not) and parameters; `None` if any type is unresolved.
    pub fn input_types(&self) -> Option<Vec<GoType>> {
        let mut out = Vec::new();
        for p in self.params.iter().filter(|p| !p.is_result) {
            out.push(GoType::clone(p.ty.as_deref()?));
        }
        let listed = self.params.iter().any(|p| p.name == DICT_PARAM);
        if !listed && let Some(index) = self.dictionary_index() {
            out.insert(index.min(out.len()), GoType::Pointer(PointerKind::Pointer));
        }
        Some(out)
    }

    pub fn result_types(&self) -> Option<Vec<GoType>> {
        self.params.iter().filter(|p| p.is_result).map(|p| p.ty.as_deref().cloned()).collect()
    }

    /// The ABI assignment for this signature, as far as DWARF describes it (see `params`).
    pub fn assignment(&self) -> Option<abi::Assignment> {
        Some(abi::assign(&self.input_types()?, &self.result_types()?))
    }
}

fn matching_bracket(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices().skip_while(|(i, _)| *i < open) {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn is_closure(segment: &str) -> bool {
    ["func", "gowrap", "deferwrap"].iter().any(|prefix| {
        segment.strip_prefix(prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Where one parameter is at some PC of its function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLocation {
    /// In `DW_OP_piece` order; a location without pieces is one piece of `size: None`.
    pub pieces: Vec<LocationPiece>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocationPiece {
    pub place: Place,
    /// Bytes, from `DW_OP_piece`; `None` for a location of the whole value.
    pub size: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// A DWARF register number (see [`abi::Reg::from_dwarf`]).
    Register(u16),
    /// In memory at this offset from SP at function entry (8 is the first stack argument).
    /// The offset holds at any PC of the function: Go addresses these through the CFA,
    /// which is entry SP + 8 for the whole call.
    Stack(i64),
    /// The piece is optimised out.
    Empty,
    /// An expression we do not evaluate.
    Unsupported,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructLayout {
    pub name: String,
    pub size: u64,
    pub fields: Vec<FieldLayout>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldLayout {
    pub name: String,
    pub offset: u64,
    /// `None` when the field's type could not be resolved.
    pub size: Option<u64>,
    pub type_name: Arc<str>,
}

/// Per-unit facts needed to rebuild a `gimli::Unit` later without its line program.
#[derive(Debug)]
struct UnitMeta {
    offset: usize,
    end: usize,
    abbreviations: Arc<gimli::Abbreviations>,
    low_pc: u64,
    addr_base: usize,
    loclists_base: usize,
    rnglists_base: usize,
    str_offsets_base: usize,
}

/// The DWARF of one Go binary, with every function indexed.
#[derive(Debug)]
pub struct DwarfInfo {
    sections: gimli::DwarfSections<Vec<u8>>,
    endian: RunTimeEndian,
    units: Vec<UnitMeta>,
    /// Sorted by `low_pc`.
    funcs: Vec<FuncDebug>,
    /// Indices into `funcs`, sorted by name.
    by_name: Vec<u32>,
    structs: HashMap<Box<str>, usize>,
    version: u16,
    incomplete_units: usize,
}

impl DwarfInfo {
    /// Reads and indexes the DWARF; `None` when the binary has none (`-ldflags=-w`).
    pub fn load(file: &object::File<'_>) -> Result<Option<DwarfInfo>, DwarfError> {
        if file.section_by_name(".debug_info").is_none() {
            return Ok(None);
        }
        // Go compresses its DWARF: inflating the sections side by side roughly halves the
        // wait on two cores (which launch mode pays before the program may start).
        let loaded: Vec<(&'static str, Result<Vec<u8>, DwarfError>)> = std::thread::scope(|scope| {
            let jobs: Vec<_> = NEEDED_SECTIONS
                .iter()
                .map(|id| {
                    let name = id.name();
                    (name, scope.spawn(move || load_section(file, name)))
                })
                .collect();
            jobs.into_iter().map(|(name, job)| (name, job.join().unwrap_or_else(|_| Ok(Vec::new())))).collect()
        });
        let mut loaded: HashMap<&'static str, Result<Vec<u8>, DwarfError>> = loaded.into_iter().collect();
        Self::from_sections(file.is_little_endian(), |name| loaded.remove(name).unwrap_or_else(|| Ok(Vec::new())))
            .map(Some)
    }

    /// Indexes DWARF whose sections come from elsewhere than an `object::File` (a live
    /// process, a core file, a test that corrupts them). `section` returns the
    /// decompressed contents of a section by name (`.debug_info`), empty when absent.
    pub fn from_sections(
        little_endian: bool,
        mut section: impl FnMut(&'static str) -> Result<Vec<u8>, DwarfError>,
    ) -> Result<DwarfInfo, DwarfError> {
        let endian = if little_endian { RunTimeEndian::Little } else { RunTimeEndian::Big };
        let mut sections = gimli::DwarfSections::load(|id| {
            if NEEDED_SECTIONS.contains(&id) { section(id.name()) } else { Ok(Vec::new()) }
        })?;
        let index = {
            let dwarf: Dwarf<'_> = sections.borrow(|s| EndianSlice::new(s, endian));
            Index::build(&dwarf)?
        };
        // Line tables were needed once, for declaration files.
        sections.debug_line = Default::default();
        let mut by_name: Vec<u32> = (0..index.funcs.len()).filter_map(|i| u32::try_from(i).ok()).collect();
        by_name.sort_by(|&a, &b| index.funcs[a as usize].name.cmp(&index.funcs[b as usize].name));
        Ok(DwarfInfo {
            sections,
            endian,
            units: index.units,
            funcs: index.funcs,
            by_name,
            structs: index.structs,
            version: index.version,
            incomplete_units: index.incomplete_units,
        })
    }

    /// Highest DWARF version among the units (4 before Go 1.25, 5 after).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Units whose entries could not be read to the end; their remaining functions are
    /// missing from the index.
    pub fn incomplete_units(&self) -> usize {
        self.incomplete_units
    }

    pub fn functions(&self) -> &[FuncDebug] {
        &self.funcs
    }

    pub fn function_by_entry(&self, entry: u64) -> Option<&FuncDebug> {
        let i = self.funcs.partition_point(|f| f.low_pc < entry);
        self.funcs.get(i).filter(|f| f.low_pc == entry)
    }

    pub fn function_containing(&self, pc: u64) -> Option<&FuncDebug> {
        let i = self.funcs.partition_point(|f| f.low_pc <= pc);
        let f = self.funcs.get(i.checked_sub(1)?)?;
        (pc < f.high_pc).then_some(f)
    }

    pub fn function_by_name(&self, name: &str) -> Option<&FuncDebug> {
        let i = self.by_name.partition_point(|&i| self.funcs[i as usize].name.as_str() < name);
        let f = &self.funcs[*self.by_name.get(i)? as usize];
        (f.name == name).then_some(f)
    }

    /// The layout of a named struct type (`runtime.g`, `net/http.Request`).
    pub fn struct_layout(&self, name: &str) -> Result<Option<StructLayout>, DwarfError> {
        let Some(&offset) = self.structs.get(name) else {
            return Ok(None);
        };
        let dwarf = self.dwarf();
        let mut types = TypeReader::new(&dwarf, &self.units);
        let (entry, unit) = types.entry(offset)?;
        let size = udata(&entry, gimli::DW_AT_byte_size).ok_or(DwarfError::BadEntry { offset, what: "struct" })?;
        let members = types.members(offset, unit)?;
        let mut fields = Vec::with_capacity(members.len());
        for member in members {
            fields.push(FieldLayout {
                size: member.ty.and_then(|t| types.go_type(t, 0).ok()).map(|t| t.size()),
                type_name: match member.ty {
                    Some(t) => types.type_name(t, 0),
                    None => Arc::from("?"),
                },
                name: member.name,
                offset: member.offset,
            });
        }
        Ok(Some(StructLayout { name: name.to_owned(), size, fields }))
    }

    /// Each parameter's location at `func.low_pc`, in the order of `func.params`; `None`
    /// where DWARF gives no location covering the entry, or only an optimised-out one.
    pub fn entry_locations(&self, func: &FuncDebug) -> Result<Vec<Option<ParamLocation>>, DwarfError> {
        self.locations_at(func, func.low_pc)
    }

    /// Like [`Self::entry_locations`], at any `pc` in the function (e.g. after the
    /// prologue, where unoptimised code has spilled register arguments).
    pub fn locations_at(&self, func: &FuncDebug, pc: u64) -> Result<Vec<Option<ParamLocation>>, DwarfError> {
        let dwarf = self.dwarf();
        let meta = self.units.get(func.unit).ok_or(DwarfError::NoUnit { offset: 0 })?;
        let unit = build_unit(&dwarf, meta)?;
        func.params.iter().map(|p| location_at(&dwarf, &unit, p.die, func, pc)).collect()
    }

    fn dwarf(&self) -> Dwarf<'_> {
        let endian = self.endian;
        self.sections.borrow(|s| EndianSlice::new(s, endian))
    }
}

/// What one pass over all entries collects.
struct Index {
    units: Vec<UnitMeta>,
    funcs: Vec<FuncDebug>,
    structs: HashMap<Box<str>, usize>,
    version: u16,
    incomplete_units: usize,
}

impl Index {
    fn build(dwarf: &Dwarf<'_>) -> Result<Index, DwarfError> {
        let mut units = Vec::new();
        let mut full_units = Vec::new();
        let mut version = 0;
        let mut headers = dwarf.units();
        while let Some(header) = headers.next().map_err(malformed("unit headers"))? {
            let offset = header.offset().0;
            let end = offset.saturating_add(header.length_including_self());
            version = version.max(header.version());
            let unit = dwarf.unit(header).map_err(malformed("unit"))?;
            units.push(UnitMeta {
                offset,
                end,
                abbreviations: unit.abbreviations.clone(),
                low_pc: unit.low_pc,
                addr_base: unit.addr_base.0,
                loclists_base: unit.loclists_base.0,
                rnglists_base: unit.rnglists_base.0,
                str_offsets_base: unit.str_offsets_base.0,
            });
            full_units.push(unit);
        }
        let mut index =
            Index { units: Vec::new(), funcs: Vec::new(), structs: HashMap::new(), version, incomplete_units: 0 };
        {
            let mut types = TypeReader::new(dwarf, &units);
            for unit_index in 0..full_units.len() {
                if index.add_unit(dwarf, &full_units, unit_index, &mut types).is_err() {
                    index.incomplete_units += 1;
                }
            }
        }
        index.units = units;
        index.funcs.sort_by_key(|f| f.low_pc);
        Ok(index)
    }

    fn add_unit<'a>(
        &mut self,
        dwarf: &Dwarf<'a>,
        units: &[Unit<'a>],
        unit_index: usize,
        types: &mut TypeReader<'_, '_>,
    ) -> Result<(), DwarfError> {
        let unit = &units[unit_index];
        let mut files = HashMap::new();
        let mut cursor = unit.entries();
        // The subprogram being filled and its depth; parameters are its direct children.
        let mut current: Option<(FuncDebug, isize)> = None;
        let result = loop {
            let entry = match cursor.next_dfs() {
                Ok(Some(entry)) => entry,
                Ok(None) => break Ok(()),
                Err(source) => {
                    break Err(DwarfError::Malformed { what: "entries", source });
                }
            };
            let depth = entry.depth();
            if let Some((func, func_depth)) = current.as_mut()
                && depth > *func_depth
            {
                if depth == *func_depth + 1
                    && entry.tag() == gimli::DW_TAG_formal_parameter
                    && let Some(param) = read_param(dwarf, units, unit, entry, types)
                {
                    func.params.push(param);
                }
                continue;
            }
            if let Some((func, _)) = current.take() {
                self.funcs.push(func);
            }
            match entry.tag() {
                gimli::DW_TAG_subprogram => {
                    current = read_subprogram(dwarf, units, unit_index, entry, &mut files).map(|func| (func, depth));
                }
                gimli::DW_TAG_structure_type => {
                    if let Some(name) = entry.attr_value(gimli::DW_AT_name).and_then(|v| attr_str(dwarf, unit, v))
                        && let Some(offset) = entry.offset().to_debug_info_offset(&unit.header)
                    {
                        self.structs.entry(name.into()).or_insert(offset.0);
                    }
                }
                _ => {}
            }
        };
        if let Some((func, _)) = current {
            self.funcs.push(func);
        }
        result
    }
}

/// The sections indexing and later queries read; the rest are never loaded.
const NEEDED_SECTIONS: [gimli::SectionId; 9] = [
    gimli::SectionId::DebugAbbrev,
    gimli::SectionId::DebugAddr,
    gimli::SectionId::DebugInfo,
    gimli::SectionId::DebugLine,
    gimli::SectionId::DebugLineStr,
    gimli::SectionId::DebugStr,
    gimli::SectionId::DebugStrOffsets,
    gimli::SectionId::DebugLoc,
    gimli::SectionId::DebugLocLists,
];

fn load_section(file: &object::File<'_>, name: &'static str) -> Result<Vec<u8>, DwarfError> {
    match file.section_by_name(name) {
        Some(section) => section
            .uncompressed_data()
            .map(|data| data.into_owned())
            .map_err(|source| DwarfError::Section { section: name, source }),
        None => Ok(Vec::new()),
    }
}

fn build_unit<'a>(dwarf: &Dwarf<'a>, meta: &UnitMeta) -> Result<Unit<'a>, DwarfError> {
    let header = dwarf.debug_info.header_from_offset(DebugInfoOffset(meta.offset)).map_err(malformed("unit header"))?;
    Ok(gimli::Unit {
        header,
        abbreviations: meta.abbreviations.clone(),
        name: None,
        comp_dir: None,
        low_pc: meta.low_pc,
        str_offsets_base: DebugStrOffsetsBase(meta.str_offsets_base),
        addr_base: DebugAddrBase(meta.addr_base),
        loclists_base: DebugLocListsBase(meta.loclists_base),
        rnglists_base: DebugRngListsBase(meta.rnglists_base),
        line_program: None,
        dwo_id: None,
    })
}

fn attr_str(dwarf: &Dwarf<'_>, unit: &Unit<'_>, value: AttributeValue<Slice<'_>>) -> Option<String> {
    let s = dwarf.attr_string(unit, value).ok()?;
    Some(s.to_string_lossy().into_owned())
}

fn udata(entry: &Entry<'_>, name: gimli::DwAt) -> Option<u64> {
    entry.attr(name)?.udata_value()
}

fn flag(entry: &Entry<'_>, name: gimli::DwAt) -> bool {
    match entry.attr_value(name) {
        Some(AttributeValue::Flag(f)) => f,
        Some(other) => other.udata_value().is_some_and(|v| v != 0),
        None => false,
    }
}

/// A reference attribute as a `.debug_info` offset, whatever its form.
fn reference(unit: &Unit<'_>, value: AttributeValue<Slice<'_>>) -> Option<usize> {
    match value {
        AttributeValue::UnitRef(offset) => Some(offset.to_debug_info_offset(&unit.header)?.0),
        AttributeValue::DebugInfoRef(offset) => Some(offset.0),
        _ => None,
    }
}

fn read_subprogram<'a>(
    dwarf: &Dwarf<'a>,
    units: &[Unit<'a>],
    unit_index: usize,
    entry: &Entry<'a>,
    files: &mut HashMap<(usize, u64), Option<Arc<str>>>,
) -> Option<FuncDebug> {
    let unit = units.get(unit_index)?;
    let low_pc = dwarf.attr_address(unit, entry.attr_value(gimli::DW_AT_low_pc)?).ok()??;
    let high_pc = match entry.attr_value(gimli::DW_AT_high_pc)? {
        AttributeValue::Udata(len) => low_pc.saturating_add(len),
        other => dwarf.attr_address(unit, other).ok()??,
    };
    // Concrete copies of inlinable functions keep their name and position in the
    // abstract origin.
    let origin = resolve_origin(units, unit, entry);
    let described = origin.as_ref().map_or(entry, |(e, _)| e);
    let name_unit = origin.as_ref().map_or(unit, |(_, u)| *u);
    let name = entry
        .attr_value(gimli::DW_AT_name)
        .and_then(|v| attr_str(dwarf, unit, v))
        .or_else(|| described.attr_value(gimli::DW_AT_name).and_then(|v| attr_str(dwarf, name_unit, v)))?;
    let decl_file = described.attr(gimli::DW_AT_decl_file).and_then(|a| a.udata_value()).and_then(|index| {
        let unit_key = name_unit.header.offset().0;
        files.entry((unit_key, index)).or_insert_with(|| file_name(dwarf, name_unit, index)).clone()
    });
    let frame_base_is_cfa = match entry.attr_value(gimli::DW_AT_frame_base) {
        Some(AttributeValue::Exprloc(expr)) => {
            let mut ops = expr.operations(unit.encoding());
            matches!(ops.next(), Ok(Some(Operation::CallFrameCFA))) && matches!(ops.next(), Ok(None))
        }
        _ => false,
    };
    Some(FuncDebug {
        name,
        low_pc,
        high_pc,
        decl_file,
        decl_line: udata(described, gimli::DW_AT_decl_line),
        params: Vec::new(),
        is_wrapper: flag(entry, gimli::DW_AT_trampoline),
        unit: unit_index,
        frame_base_is_cfa,
    })
}

/// Follows `DW_AT_abstract_origin` to the entry that carries the declaration.
fn resolve_origin<'a, 'u>(
    units: &'u [Unit<'a>],
    unit: &'u Unit<'a>,
    entry: &Entry<'a>,
) -> Option<(Entry<'a>, &'u Unit<'a>)> {
    let mut found: Option<(Entry<'a>, &'u Unit<'a>)> = None;
    for _ in 0..MAX_ORIGIN_DEPTH {
        let (current, current_unit) = match &found {
            Some((e, u)) => (e, *u),
            None => (entry, unit),
        };
        let Some(target) = current.attr_value(gimli::DW_AT_abstract_origin).and_then(|v| reference(current_unit, v))
        else {
            break;
        };
        found = Some(entry_at(units, target)?);
    }
    found
}

/// Reads the entry at a `.debug_info` offset in whichever unit contains it.
fn entry_at<'a, 'u>(units: &'u [Unit<'a>], offset: usize) -> Option<(Entry<'a>, &'u Unit<'a>)> {
    let i = units.partition_point(|u| u.header.offset().0 <= offset);
    let unit = units.get(i.checked_sub(1)?)?;
    let unit_offset = DebugInfoOffset(offset).to_unit_offset(&unit.header)?;
    let entry = unit.entry(unit_offset).ok()?;
    Some((entry, unit))
}

fn file_name(dwarf: &Dwarf<'_>, unit: &Unit<'_>, index: u64) -> Option<Arc<str>> {
    let header = unit.line_program.as_ref()?.header();
    let file = header.file(index)?;
    let path = attr_str(dwarf, unit, file.path_name())?;
    if path.starts_with('/') {
        return Some(path.into());
    }
    let dir = file.directory(header).and_then(|d| attr_str(dwarf, unit, d)).unwrap_or_default();
    if dir.is_empty() || dir == "." {
        Some(path.into())
    } else {
        Some(format!("{}/{}", dir.trim_end_matches('/'), path).into())
    }
}

fn read_param<'a>(
    dwarf: &Dwarf<'a>,
    units: &[Unit<'a>],
    unit: &Unit<'a>,
    entry: &Entry<'a>,
    types: &mut TypeReader<'_, '_>,
) -> Option<ParamDebug> {
    let die = entry.offset().to_debug_info_offset(&unit.header)?.0;
    let origin = resolve_origin(units, unit, entry);
    let (described, described_unit) = match &origin {
        Some((e, u)) => (e, *u),
        None => (entry, unit),
    };
    let name = entry
        .attr_value(gimli::DW_AT_name)
        .or_else(|| described.attr_value(gimli::DW_AT_name))
        .and_then(|v| attr_str(dwarf, described_unit, v))
        .unwrap_or_default();
    let is_result = if entry.has_attr(gimli::DW_AT_variable_parameter) {
        flag(entry, gimli::DW_AT_variable_parameter)
    } else {
        flag(described, gimli::DW_AT_variable_parameter)
    };
    let type_ref = entry
        .attr_value(gimli::DW_AT_type)
        .and_then(|v| reference(unit, v))
        .or_else(|| described.attr_value(gimli::DW_AT_type).and_then(|v| reference(described_unit, v)));
    let (type_name, ty) = match type_ref {
        Some(t) => (types.type_name(t, 0), types.go_type(t, 0).ok()),
        None => (Arc::from("?"), None),
    };
    Some(ParamDebug { name, type_name, ty, is_result, die })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn func(name: &str) -> FuncDebug {
        FuncDebug {
            name: name.into(),
            low_pc: 0,
            high_pc: 0,
            decl_file: None,
            decl_line: None,
            params: Vec::new(),
            is_wrapper: false,
            unit: 0,
            frame_base_is_cfa: true,
        }
    }

    #[test]
    fn shareable_across_threads() {
        fn check<T: Send + Sync>() {}
        check::<DwarfInfo>();
    }

    #[test]
    fn dictionary_detection() {
        let with = [
            "main.Map[go.shape.string,go.shape.int]",
            "main.(*List[go.shape.int]).Push",
            "main.List[go.shape.int].Len",
            "main.Sum[go.shape.[]go.shape.int]",
        ];
        let without = [
            "main.Map[go.shape.string,go.shape.int].func1",
            "main.Map[go.shape.int].func1.2",
            "main.(*List[go.shape.int]).Push.func3",
            "main.Plain",
            "main.Map[...]",
            "type:.eq.internal/sync.entry[go.shape.interface {},go.shape.interface {}]",
            "main.(*List[go.shape.int]).Push-fm",
        ];
        for name in with {
            assert!(func(name).has_dictionary(), "{name}");
        }
        assert_eq!(func(with[0]).dictionary_index(), Some(0));
        assert_eq!(func(with[1]).dictionary_index(), Some(1));
        assert_eq!(func(with[2]).dictionary_index(), Some(1));
        for name in without {
            assert!(!func(name).has_dictionary(), "{name}");
        }
    }

    fn expr(bytes: &[u8]) -> ParamLocation {
        let encoding = gimli::Encoding { format: gimli::Format::Dwarf32, version: 5, address_size: 8 };
        evaluate(gimli::Expression(EndianSlice::new(bytes, RunTimeEndian::Little)), encoding, true, true)
    }

    #[test]
    fn evaluates_go_location_forms() {
        use Place::*;
        let piece = |place, size| LocationPiece { place, size };
        // DW_OP_reg0
        assert_eq!(expr(&[0x50]).pieces, [piece(Register(0), None)]);
        // DW_OP_call_frame_cfa
        assert_eq!(expr(&[0x9c]).pieces, [piece(Stack(8), None)]);
        // DW_OP_fbreg +8
        assert_eq!(expr(&[0x91, 0x08]).pieces, [piece(Stack(16), None)]);
        // DW_OP_reg3 DW_OP_piece 8 DW_OP_piece 8 DW_OP_reg17 DW_OP_piece 4
        assert_eq!(
            expr(&[0x53, 0x93, 0x08, 0x93, 0x08, 0x61, 0x93, 0x04]).pieces,
            [piece(Register(3), Some(8)), piece(Empty, Some(8)), piece(Register(17), Some(4))]
        );
        // DW_OP_breg7 +16
        assert_eq!(expr(&[0x77, 0x10]).pieces, [piece(Stack(16), None)]);
        // DW_OP_lit1 DW_OP_stack_value: not a place we read.
        assert_eq!(expr(&[0x31, 0x9f]).pieces, [piece(Unsupported, None)]);
        // Empty expression and truncated operands.
        assert_eq!(expr(&[]).pieces, [piece(Empty, None)]);
        assert_eq!(expr(&[0x91]).pieces, [piece(Unsupported, None)]);
        assert_eq!(expr(&[0x93]).pieces, [piece(Unsupported, None)]);
    }
}
