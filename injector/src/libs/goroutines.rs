//! Goroutine lineage, which every library's trace context needs: a goroutine inherits the
//! context active (or pending) on the one that created it, in the target
//! (`runtime.newproc1`, `Op::Inherit`), and forgets its own when it exits
//! (`runtime.goexit1`). Planned whenever another library is, so that a pure gRPC service
//! gets it as much as an HTTP one.

use trampolines::codegen::{CapturePlan, Fetch, FieldCopy, Op};

use super::{LibProbe, LibState, Library, Notes, OpenSpans, PlanCx, Planned};
use crate::ring::Record;

const SPAWN: u8 = 0;
const EXIT: u8 = 1;

pub struct Goroutines;

impl Library for Goroutines {
    fn name(&self) -> &'static str {
        "goroutines"
    }

    fn scope(&self) -> &'static str {
        "inject/goroutines"
    }

    fn support(&self) -> bool {
        true
    }

    fn plan(&self, cx: &PlanCx<'_>) -> Planned {
        let mut offsets = go_abi::runtime::FieldOffsets::new(cx.ctx.dwarf.as_ref(), cx.release);
        let mut need = |key: &str| offsets.get(key).and_then(|o| i32::try_from(o).ok()).ok_or_else(|| key.to_string());
        let off = CapturePlan { off: true, ..CapturePlan::default() };
        let spawn = (|| -> Result<(CapturePlan, CapturePlan), String> {
            let goid_off = need("runtime.g.goid")?;
            let parent_goid_off = need("runtime.g.parentGoid")?;
            let word = |off, dest| {
                Op::Field(FieldCopy {
                    reg: 0,
                    path: Vec::new(),
                    off,
                    fetch: Fetch::Word,
                    dest,
                    when: Vec::new(),
                    keep_on_miss: false,
                })
            };
            let ops =
                vec![Op::Inherit { g: 0, goid_off, parent_goid_off }, word(goid_off, 0), word(parent_goid_off, 8)];
            Ok((off.clone(), CapturePlan { ops, ..CapturePlan::default() }))
        })();
        // goexit1 has no parameters: the registers Forget uses hold nothing at its entry.
        let exit = (CapturePlan { ops: vec![Op::Forget], bare: true, ..CapturePlan::default() }, off.clone());
        super::plan_candidates(cx, &[(SPAWN, "runtime.newproc1"), (EXIT, "runtime.goexit1")], |p| match p {
            SPAWN => spawn.clone(),
            _ => Ok(exit.clone()),
        })
    }

    fn is_span(&self, _probe: u8) -> bool {
        false
    }

    fn state(&self) -> Box<dyn LibState> {
        Box::new(Lineage)
    }
}

struct Lineage;

impl LibState for Lineage {
    fn span_start(&mut self, _probe: u8, _rec: &Record) -> Option<Notes> {
        None
    }

    fn event(&mut self, probe: LibProbe, rec: Record, spans: &mut dyn OpenSpans) {
        if probe.probe != SPAWN {
            // goexit1's probe records nothing (it runs bare).
            return;
        }
        let word = |i: usize| rec.data.get(i..i + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
        if let (Some(child), Some(parent)) = (word(0), word(8)) {
            spans.spawned(child, parent);
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
