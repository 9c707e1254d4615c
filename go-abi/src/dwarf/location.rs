//! Where a parameter lives at a PC: DWARF location lists and expressions evaluated to
//! registers and stack slots (the register ABI's pieces included).

use super::*;

pub(super) fn location_at(
    dwarf: &Dwarf<'_>,
    unit: &Unit<'_>,
    die: usize,
    func: &FuncDebug,
    pc: u64,
) -> Result<Option<ParamLocation>, DwarfError> {
    let unit_offset = DebugInfoOffset(die).to_unit_offset(&unit.header).ok_or(DwarfError::NoUnit { offset: die })?;
    let entry = unit.entry(unit_offset).map_err(malformed("parameter entry"))?;
    let Some(value) = entry.attr_value(gimli::DW_AT_location) else {
        return Ok(None);
    };
    let expression = match value {
        AttributeValue::Exprloc(expr) => expr,
        other => {
            let Some(mut list) = dwarf.attr_locations(unit, other).map_err(malformed("location list"))? else {
                return Ok(None);
            };
            let mut found = None;
            while let Some(item) = list.next().map_err(malformed("location list"))? {
                if item.range.begin <= pc && pc < item.range.end {
                    found = Some(item.data);
                    break;
                }
            }
            match found {
                Some(expr) => expr,
                None => return Ok(None),
            }
        }
    };
    let location = evaluate(expression, unit.encoding(), func.frame_base_is_cfa, pc == func.low_pc);
    if location.pieces.iter().all(|p| p.place == Place::Empty) {
        return Ok(None);
    }
    Ok(Some(location))
}

/// Turns a location expression into pieces, for the simple forms Go emits.
pub(super) fn evaluate(
    expression: gimli::Expression<Slice<'_>>,
    encoding: gimli::Encoding,
    frame_base_is_cfa: bool,
    at_entry: bool,
) -> ParamLocation {
    // The CFA (SP before the CALL) is entry SP + 8.
    const CFA_AT_ENTRY: i64 = 8;
    const RSP: u16 = 7;
    let mut pieces = Vec::new();
    let mut current: Option<Place> = None;
    let mut ops = expression.operations(encoding);
    loop {
        let op = match ops.next() {
            Ok(Some(op)) => op,
            Ok(None) => break,
            Err(_) => {
                current = Some(Place::Unsupported);
                break;
            }
        };
        current = match op {
            Operation::Register { register } => Some(Place::Register(register.0)),
            Operation::FrameOffset { offset } if frame_base_is_cfa => {
                Some(CFA_AT_ENTRY.checked_add(offset).map_or(Place::Unsupported, Place::Stack))
            }
            Operation::CallFrameCFA => Some(Place::Stack(CFA_AT_ENTRY)),
            Operation::RegisterOffset { register, offset, .. } if register.0 == RSP && at_entry => {
                Some(Place::Stack(offset))
            }
            Operation::PlusConstant { value } => match current {
                Some(Place::Stack(base)) => Some(
                    i64::try_from(value)
                        .ok()
                        .and_then(|v| base.checked_add(v))
                        .map_or(Place::Unsupported, Place::Stack),
                ),
                _ => Some(Place::Unsupported),
            },
            Operation::Nop => current,
            Operation::Piece { size_in_bits, bit_offset } => {
                let place = if bit_offset.is_none() && size_in_bits % 8 == 0 {
                    current.unwrap_or(Place::Empty)
                } else {
                    Place::Unsupported
                };
                pieces.push(LocationPiece { place, size: Some(size_in_bits / 8) });
                None
            }
            _ => Some(Place::Unsupported),
        };
    }
    if let Some(place) = current {
        pieces.push(LocationPiece { place, size: None });
    } else if pieces.is_empty() {
        pieces.push(LocationPiece { place: Place::Empty, size: None });
    }
    ParamLocation { pieces }
}
