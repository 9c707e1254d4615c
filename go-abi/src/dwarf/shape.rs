//! What it takes to show a value field by field: a parameter's type resolved from DWARF
//! down to a depth (pointers followed, slices' elements typed), so that a probe can copy
//! exactly the words it needs at the call and the output can name every field.

use super::*;
use crate::abi::{Scalar, scalar};

/// A value's type as far as showing it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    Scalar {
        name: String,
        scalar: Scalar,
    },
    String,
    /// A pointer, with what it points to when that was followed (within the depth).
    Pointer {
        name: String,
        target: Option<Box<Shape>>,
    },
    Struct {
        name: String,
        size: u64,
        align: u64,
        fields: Vec<ShapeField>,
    },
    /// A slice, with its element's size and, within the depth, its shape.
    Slice {
        name: String,
        elem_size: u64,
        elem: Option<Box<Shape>>,
    },
    /// Interfaces (two words: type or itab, data); `empty` for `any`.
    Interface {
        name: String,
        empty: bool,
    },
    /// Anything else (maps, channels, funcs, arrays, complex numbers): its name and size.
    Other {
        name: String,
        size: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeField {
    pub name: String,
    pub offset: u64,
    pub shape: Shape,
}

impl Shape {
    /// The Go type's name (`*main.Item`, `[]main.Item`, `int`).
    pub fn name(&self) -> String {
        match self {
            Shape::String => "string".into(),
            Shape::Scalar { name, .. }
            | Shape::Pointer { name, .. }
            | Shape::Struct { name, .. }
            | Shape::Slice { name, .. }
            | Shape::Interface { name, .. }
            | Shape::Other { name, .. } => name.clone(),
        }
    }
}

/// Struct fields shown per struct, at most (a larger struct shows its first ones).
pub const MAX_FIELDS: usize = 32;

impl DwarfInfo {
    /// The shape of `param`'s type, following pointers and slices' elements `depth`
    /// levels deep (0: the value itself, a pointer shown by its address). None when its
    /// type is not described.
    pub fn param_shape(&self, param: &ParamDebug, depth: u32) -> Result<Option<Shape>, DwarfError> {
        let dwarf = self.dwarf();
        let mut types = TypeReader::new(&dwarf, &self.units);
        let (entry, unit) = types.entry(param.die)?;
        let Some(ty) = types.type_ref(unit, &entry) else { return Ok(None) };
        types.shape(ty, depth, 0).map(Some)
    }
}

impl TypeReader<'_, '_> {
    /// `levels`: pointers still to follow; `nest`: how deep the walk is (bounded, so
    /// corrupt or self-referencing input ends).
    fn shape(&mut self, offset: usize, levels: u32, nest: u32) -> Result<Shape, DwarfError> {
        let name = self.type_name(offset, 0).to_string();
        let ty = self.go_type(offset, 0)?;
        if nest > MAX_TYPE_DEPTH {
            return Ok(Shape::Other { name, size: ty.size() });
        }
        if let Some(scalar) = scalar(&ty) {
            return Ok(Shape::Scalar { name, scalar });
        }
        Ok(match &*ty {
            GoType::String => Shape::String,
            GoType::Interface { empty } => Shape::Interface { name, empty: *empty },
            GoType::Pointer(PointerKind::Pointer) => {
                let target = match (levels, self.pointee(offset)?) {
                    (1.., Some(t)) => Some(Box::new(self.shape(t, levels - 1, nest + 1)?)),
                    _ => None,
                };
                Shape::Pointer { name, target }
            }
            GoType::Slice => {
                // Go describes a slice as a struct whose first member points to the elements.
                let at = self.concrete(offset)?;
                let (_, unit) = self.entry(at)?;
                let array = self.members(at, unit)?.into_iter().next().and_then(|m| m.ty);
                let elem = match array {
                    Some(a) => self.pointee(a)?,
                    None => None,
                };
                match elem {
                    Some(e) => {
                        let elem_size = self.go_type(e, 0)?.size();
                        let elem = match levels {
                            1.. => Some(Box::new(self.shape(e, levels - 1, nest + 1)?)),
                            0 => None,
                        };
                        Shape::Slice { name, elem_size, elem }
                    }
                    None => Shape::Other { name, size: ty.size() },
                }
            }
            GoType::Struct(s) => {
                let at = self.concrete(offset)?;
                let (_, unit) = self.entry(at)?;
                let mut fields = Vec::new();
                for m in self.members(at, unit)?.into_iter().take(MAX_FIELDS) {
                    let Some(t) = m.ty else { continue };
                    fields.push(ShapeField { name: m.name, offset: m.offset, shape: self.shape(t, levels, nest + 1)? });
                }
                Shape::Struct { name, size: s.size, align: ty.align(), fields }
            }
            _ => Shape::Other { name, size: ty.size() },
        })
    }

    /// The entry behind typedefs.
    fn concrete(&mut self, mut offset: usize) -> Result<usize, DwarfError> {
        for _ in 0..MAX_TYPE_DEPTH {
            let (entry, unit) = self.entry(offset)?;
            if entry.tag() != gimli::DW_TAG_typedef {
                return Ok(offset);
            }
            offset = self.type_ref(unit, &entry).ok_or(DwarfError::BadEntry { offset, what: "typedef" })?;
        }
        Err(DwarfError::BadEntry { offset, what: "typedef (nested too deeply)" })
    }

    /// What the pointer type at `offset` points to.
    fn pointee(&mut self, offset: usize) -> Result<Option<usize>, DwarfError> {
        let at = self.concrete(offset)?;
        let (entry, unit) = self.entry(at)?;
        Ok(self.type_ref(unit, &entry))
    }
}
