//! Go types from DWARF: names, sizes, struct layouts and the kinds Go records in its own
//! attribute, read with a depth bound so that hostile input cannot recurse forever.

use super::*;

pub(super) struct Member {
    pub(super) name: String,
    pub(super) offset: u64,
    pub(super) ty: Option<usize>,
}

/// Resolves type entries to names and [`GoType`]s, remembering each by offset.
pub(super) struct TypeReader<'d, 'm> {
    pub(super) dwarf: &'d Dwarf<'d>,
    pub(super) units: &'m [UnitMeta],
    pub(super) built: HashMap<usize, Unit<'d>>,
    pub(super) names: HashMap<usize, Arc<str>>,
    pub(super) types: HashMap<usize, Option<Arc<GoType>>>,
}

impl<'d, 'm> TypeReader<'d, 'm> {
    pub(super) fn new(dwarf: &'d Dwarf<'d>, units: &'m [UnitMeta]) -> Self {
        TypeReader { dwarf, units, built: HashMap::new(), names: HashMap::new(), types: HashMap::new() }
    }

    pub(super) fn unit_index(&self, offset: usize) -> Result<usize, DwarfError> {
        let i = self.units.partition_point(|u| u.offset <= offset);
        let i = i.checked_sub(1).ok_or(DwarfError::NoUnit { offset })?;
        if offset < self.units[i].end { Ok(i) } else { Err(DwarfError::NoUnit { offset }) }
    }

    /// The unit with this index in `units`, built on first use.
    pub(super) fn unit(&mut self, index: usize) -> Result<&Unit<'d>, DwarfError> {
        let meta = self.units.get(index).ok_or(DwarfError::NoUnit { offset: usize::MAX })?;
        if !self.built.contains_key(&index) {
            let unit = build_unit(self.dwarf, meta)?;
            self.built.insert(index, unit);
        }
        self.built.get(&index).ok_or(DwarfError::NoUnit { offset: meta.offset })
    }

    pub(super) fn entry(&mut self, offset: usize) -> Result<(Entry<'d>, usize), DwarfError> {
        let index = self.unit_index(offset)?;
        let unit = self.unit(index)?;
        let unit_offset: UnitOffset =
            DebugInfoOffset(offset).to_unit_offset(&unit.header).ok_or(DwarfError::NoUnit { offset })?;
        let entry = unit.entry(unit_offset).map_err(malformed("type entry"))?;
        Ok((entry, index))
    }

    pub(super) fn string(&mut self, unit: usize, value: AttributeValue<Slice<'d>>) -> Option<String> {
        let dwarf = self.dwarf;
        let unit = self.unit(unit).ok()?;
        attr_str(dwarf, unit, value)
    }

    pub(super) fn type_ref(&mut self, unit: usize, entry: &Entry<'d>) -> Option<usize> {
        let value = entry.attr_value(gimli::DW_AT_type)?;
        let unit = self.unit(unit).ok()?;
        reference(unit, value)
    }

    /// Go's spelling of the type; synthetic typedefs of generic code (`.param0`) and
    /// unnamed entries show their target's name.
    pub(super) fn type_name(&mut self, offset: usize, depth: u32) -> Arc<str> {
        if let Some(name) = self.names.get(&offset) {
            return name.clone();
        }
        self.names.insert(offset, Arc::from("?"));
        let name = self.compute_type_name(offset, depth);
        self.names.insert(offset, name.clone());
        name
    }

    pub(super) fn compute_type_name(&mut self, offset: usize, depth: u32) -> Arc<str> {
        let Ok((entry, unit)) = self.entry(offset) else {
            return Arc::from("?");
        };
        let name = entry.attr_value(gimli::DW_AT_name).and_then(|v| self.string(unit, v));
        match name {
            Some(n) if !n.starts_with('.') => Arc::from(n),
            _ if depth < MAX_TYPE_DEPTH => match self.type_ref(unit, &entry) {
                Some(target) => self.type_name(target, depth + 1),
                None => Arc::from("?"),
            },
            _ => Arc::from("?"),
        }
    }

    pub(super) fn go_type(&mut self, offset: usize, depth: u32) -> Result<Arc<GoType>, DwarfError> {
        match self.types.get(&offset) {
            Some(Some(known)) => return Ok(known.clone()),
            Some(None) => {
                return Err(DwarfError::BadEntry { offset, what: "type" });
            }
            None => {}
        }
        // Marked before resolving, so a cycle in corrupt input fails instead of recursing,
        // and each entry is resolved at most once.
        self.types.insert(offset, None);
        let resolved = self.compute_go_type(offset, depth).map(Arc::new);
        if let Ok(ty) = &resolved {
            self.types.insert(offset, Some(ty.clone()));
        }
        resolved
    }

    pub(super) fn compute_go_type(&mut self, offset: usize, depth: u32) -> Result<GoType, DwarfError> {
        let bad = |what| DwarfError::BadEntry { offset, what };
        if depth > MAX_TYPE_DEPTH {
            return Err(bad("type (nested too deeply)"));
        }
        let (entry, unit) = self.entry(offset)?;
        let size = udata(&entry, gimli::DW_AT_byte_size);
        let int = |size: u8, signed| GoType::Int { size, signed };
        // Go 1.21 writes kind 0 (invalid) on some pointer types it synthesises.
        let Some(go_kind) = udata(&entry, DW_AT_GO_KIND).filter(|&k| k != 0) else {
            return self.type_without_kind(offset, &entry, unit, size, depth);
        };
        Ok(match go_kind {
            kind::BOOL => GoType::Bool,
            kind::INT => int(8, true),
            kind::INT8 => int(1, true),
            kind::INT16 => int(2, true),
            kind::INT32 => int(4, true),
            kind::INT64 => int(8, true),
            kind::UINT => int(8, false),
            kind::UINT8 => int(1, false),
            kind::UINT16 => int(2, false),
            kind::UINT32 => int(4, false),
            kind::UINT64 => int(8, false),
            kind::UINTPTR => GoType::Uintptr,
            kind::FLOAT32 => GoType::Float32,
            kind::FLOAT64 => GoType::Float64,
            kind::COMPLEX64 => GoType::Complex64,
            kind::COMPLEX128 => GoType::Complex128,
            kind::CHAN => GoType::Pointer(PointerKind::Chan),
            kind::FUNC => GoType::Pointer(PointerKind::Func),
            kind::MAP => GoType::Pointer(PointerKind::Map),
            kind::POINTER => GoType::Pointer(PointerKind::Pointer),
            kind::UNSAFE_POINTER => GoType::Pointer(PointerKind::UnsafePointer),
            kind::STRING => GoType::String,
            kind::SLICE => GoType::Slice,
            kind::INTERFACE => {
                // The typedef points at runtime.eface or runtime.iface.
                let target = self.type_ref(unit, &entry);
                let target_name = match target {
                    Some(t) => self.type_name(t, depth + 1),
                    None => Arc::from(""),
                };
                let own_name = self.type_name(offset, depth);
                GoType::Interface {
                    empty: &*target_name == "runtime.eface" || (target.is_none() && &*own_name == "interface {}"),
                }
            }
            kind::ARRAY => self.array(offset, &entry, unit, depth)?,
            kind::STRUCT => self.structure(offset, unit, size, depth)?,
            _ => return Err(bad("type (unknown go kind)")),
        })
    }

    pub(super) fn type_without_kind(
        &mut self,
        offset: usize,
        entry: &Entry<'d>,
        unit: usize,
        size: Option<u64>,
        depth: u32,
    ) -> Result<GoType, DwarfError> {
        let bad = |what| DwarfError::BadEntry { offset, what };
        Ok(match entry.tag() {
            gimli::DW_TAG_typedef => {
                let target = self.type_ref(unit, entry).ok_or(bad("typedef"))?;
                GoType::clone(&*self.go_type(target, depth + 1)?)
            }
            gimli::DW_TAG_pointer_type => GoType::Pointer(if entry.has_attr(gimli::DW_AT_type) {
                PointerKind::Pointer
            } else {
                PointerKind::UnsafePointer
            }),
            gimli::DW_TAG_subroutine_type => GoType::Pointer(PointerKind::Func),
            gimli::DW_TAG_base_type => {
                let encoding = match entry.attr_value(gimli::DW_AT_encoding) {
                    Some(AttributeValue::Encoding(e)) => e,
                    _ => return Err(bad("base type")),
                };
                let size = size.ok_or(bad("base type"))?;
                match (encoding, size) {
                    (gimli::DW_ATE_boolean, 1) => GoType::Bool,
                    (gimli::DW_ATE_signed | gimli::DW_ATE_signed_char, 1 | 2 | 4 | 8) => {
                        GoType::Int { size: size as u8, signed: true }
                    }
                    (gimli::DW_ATE_unsigned | gimli::DW_ATE_unsigned_char, 1 | 2 | 4 | 8) => {
                        GoType::Int { size: size as u8, signed: false }
                    }
                    (gimli::DW_ATE_float, 4) => GoType::Float32,
                    (gimli::DW_ATE_float, 8) => GoType::Float64,
                    (gimli::DW_ATE_complex_float, 8) => GoType::Complex64,
                    (gimli::DW_ATE_complex_float, 16) => GoType::Complex128,
                    _ => return Err(bad("base type")),
                }
            }
            gimli::DW_TAG_structure_type => self.structure(offset, unit, size, depth)?,
            gimli::DW_TAG_array_type => self.array(offset, entry, unit, depth)?,
            _ => return Err(bad("type")),
        })
    }

    pub(super) fn array(
        &mut self,
        offset: usize,
        entry: &Entry<'d>,
        unit: usize,
        depth: u32,
    ) -> Result<GoType, DwarfError> {
        let bad = || DwarfError::BadEntry { offset, what: "array" };
        let elem_ref = self.type_ref(unit, entry).ok_or_else(bad)?;
        let elem = self.go_type(elem_ref, depth + 1)?;
        let mut len = None;
        self.children(offset, unit, |child| {
            if child.tag() == gimli::DW_TAG_subrange_type && len.is_none() {
                len = udata(child, gimli::DW_AT_count)
                    .or_else(|| udata(child, gimli::DW_AT_upper_bound).and_then(|u| u.checked_add(1)));
            }
        })?;
        let len = len.ok_or_else(bad)?;
        Ok(GoType::Array { len, elem: Box::new(GoType::clone(&elem)) })
    }

    pub(super) fn structure(
        &mut self,
        offset: usize,
        unit: usize,
        size: Option<u64>,
        depth: u32,
    ) -> Result<GoType, DwarfError> {
        let size = size.ok_or(DwarfError::BadEntry { offset, what: "struct" })?;
        let members = self.members(offset, unit)?;
        let mut fields = Vec::with_capacity(members.len());
        for member in members {
            let ty_ref = member.ty.ok_or(DwarfError::BadEntry { offset, what: "struct member" })?;
            let ty = self.go_type(ty_ref, depth + 1)?;
            fields.push(abi::Field { name: member.name, offset: member.offset, ty: GoType::clone(&ty) });
        }
        Ok(GoType::Struct(StructType { size, fields }))
    }

    pub(super) fn members(&mut self, offset: usize, unit: usize) -> Result<Vec<Member>, DwarfError> {
        let mut raw = Vec::new();
        self.children(offset, unit, |child| {
            if child.tag() == gimli::DW_TAG_member {
                raw.push((
                    child.attr_value(gimli::DW_AT_name),
                    child.attr(gimli::DW_AT_data_member_location).and_then(|a| a.udata_value()),
                    child.attr_value(gimli::DW_AT_type),
                ));
            }
        })?;
        let mut members = Vec::with_capacity(raw.len());
        for (name, member_offset, ty) in raw {
            let member_offset = member_offset.ok_or(DwarfError::BadEntry { offset, what: "struct member offset" })?;
            let name = name.and_then(|v| self.string(unit, v)).unwrap_or_default();
            let ty = match ty {
                Some(v) => reference(self.unit(unit)?, v),
                None => None,
            };
            members.push(Member { name, offset: member_offset, ty });
        }
        Ok(members)
    }

    /// Calls `visit` for each direct child of the entry at `offset`.
    pub(super) fn children(
        &mut self,
        offset: usize,
        unit: usize,
        mut visit: impl FnMut(&Entry<'d>),
    ) -> Result<(), DwarfError> {
        let unit = self.unit(unit)?;
        let unit_offset = DebugInfoOffset(offset).to_unit_offset(&unit.header).ok_or(DwarfError::NoUnit { offset })?;
        let mut cursor = unit.entries_at_offset(unit_offset).map_err(malformed("type children"))?;
        let Some(parent) = cursor.next_dfs().map_err(malformed("type children"))? else {
            return Ok(());
        };
        if !parent.has_children() {
            return Ok(());
        }
        let base = parent.depth();
        while let Some(child) = cursor.next_dfs().map_err(malformed("type children"))? {
            let depth = child.depth();
            if depth <= base {
                break;
            }
            if depth == base + 1 {
                visit(child);
            }
        }
        Ok(())
    }
}
