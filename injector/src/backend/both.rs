//! `--backend auto` with sites for each backend: trampolines where the patcher installs,
//! uprobes for the sites it refused, writing into the same ring: the pump is one more
//! writer of the trampolines' ring (inject's own mapping of it), so the collector reads
//! one stream and the records of both pair up as usual.

use anyhow::Result;
use go_abi::GoBinary;
use ring_abi::Layout;
use trampolines::RingAddrs;

use super::trampoline::{Installation, install_trampolines};
use super::uprobe::{Attached, RingWriter};
use super::{Backend, Installed, Probes, Removal};
use crate::plan::{ProbeSite, Via};
use crate::ring::RingReader;

/// Trampolines and uprobes at once.
pub struct Both;

impl Backend for Both {
    fn recover(&self, pid: i32, bin: &GoBinary<'_>, bias: u64) -> Result<Option<String>> {
        super::trampoline::Trampolines.recover(pid, bin, bias)
    }

    fn held(&self, pid: i32) -> Option<String> {
        super::trampoline::Trampolines.held(pid)
    }

    fn install(
        &self,
        pid: i32,
        bin: &GoBinary<'_>,
        bias: u64,
        sites: &[ProbeSite],
        ring: RingAddrs,
    ) -> Result<Box<dyn Probes>> {
        // Twice the sub-rings, each half as long: the trampolines use the first half (by
        // P id), the pump the second, so each sub-ring has writers of one kind and its
        // records stay in time order.
        let l = ring.layout;
        let (rings, share) = match Layout::new(l.rings * 2, (l.capacity / 2).max(64), l.slot_size) {
            Ok(doubled) => (doubled.with_sites(l.sites).with_arena(l.arena), (l.rings, l.rings)),
            Err(_) => (l, (0, l.rings)),
        };
        let ring = RingAddrs { layout: rings, ..ring };
        // Only the trampolines' own sites: a site the patcher could take may have gone to
        // uprobes with the trace context (`one_home_for_context`), and one address must
        // never get both (the kernel would step the INT3's instruction, then resume inside
        // the jump).
        let ours: Vec<ProbeSite> = sites.iter().filter(|s| s.via == Via::Trampoline).cloned().collect();
        let mut inst = install_trampolines(pid, bin, bias, &ours, ring)?;
        let writer = RingWriter {
            base: inst.ring_map.as_mut_ptr(),
            len: inst.ring_map.len(),
            layout: inst.layout,
            lossless: ring.wait_spins > 0,
            rings: share,
        };
        let uprobes = match Attached::attach(pid, bin, bias, sites, &ring, writer) {
            Ok(u) => u,
            Err(e) => {
                // Nothing of it may stay: the trampolines come out again.
                let _ = Probes::remove(&inst);
                return Err(e);
            }
        };
        let mut summary = inst.summary.clone();
        summary.sites.extend(uprobes.sites.iter().copied());
        Ok(Box::new(BothProbes { inst, uprobes, summary }))
    }
}

/// Both kinds of probe in one process. Fields drop in order: the uprobes (and the pump
/// writing into the trampolines' ring) before the ring's mapping.
struct BothProbes {
    uprobes: Attached,
    inst: Installation,
    summary: Installed,
}

impl Probes for BothProbes {
    fn installed(&self) -> &Installed {
        &self.summary
    }

    fn reader(&mut self, shapes: Vec<[crate::ring::DataShape; 2]>) -> RingReader {
        self.inst.reader(shapes)
    }

    fn remove(&self) -> Result<Removal> {
        let up = self.uprobes.detach();
        let mut r = Probes::remove(&self.inst)?;
        r.uprobes = up.uprobes;
        Ok(r)
    }

    fn flush(&self) {
        Probes::flush(&self.inst);
    }

    fn drain(&self) {
        self.uprobes.stop_pump();
    }
}
