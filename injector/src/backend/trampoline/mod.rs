//! The trampoline backend: each probe is a 5-byte jump at an instruction boundary of the
//! function to a generated trampoline that writes a record into a shared-memory ring and
//! returns to a relocated copy of the stolen instructions. Installing and removing happen
//! in short ptrace windows ([`ptrace`]); the patches and memory are journalled in the ring
//! so that a later inject can undo what a killed one left ([`recover`]).

mod install;
mod parked;
pub mod ptrace;
mod recover;
mod window;

use anyhow::Result;
use go_abi::GoBinary;
use trampolines::RingAddrs;

use super::{Backend, Installed, Probes, Removal};
use crate::plan::ProbeSite;
use crate::ring::RingReader;

pub use install::{Installation, install as install_trampolines};

/// The trampoline backend.
pub struct Trampolines;

impl Backend for Trampolines {
    fn recover(&self, pid: i32, bin: &GoBinary<'_>, bias: u64) -> Result<Option<String>> {
        let cleaned = recover::clean(pid, &window::pad_site(bin, bias)?)?;
        Ok(cleaned.describe(pid))
    }

    fn held(&self, pid: i32) -> Option<String> {
        recover::leftovers(pid).err()?.downcast_ref::<recover::Held>().map(ToString::to_string)
    }

    fn install(
        &self,
        pid: i32,
        bin: &GoBinary<'_>,
        bias: u64,
        sites: &[ProbeSite],
        ring: RingAddrs,
    ) -> Result<Box<dyn Probes>> {
        Ok(Box::new(install::install(pid, bin, bias, sites, ring)?))
    }
}

impl Probes for Installation {
    fn installed(&self) -> &Installed {
        &self.summary
    }

    fn reader(&mut self, shapes: Vec<[crate::ring::DataShape; 2]>) -> RingReader {
        Installation::reader(self, shapes)
    }

    fn remove(&self) -> Result<Removal> {
        install::remove(self)
    }

    fn flush(&self) {
        let _ = self.ring_map.flush();
    }
}
