//! Reading and writing the target's memory during a session: `process_vm_readv` and
//! `/proc/PID/mem`, with a `PTRACE_POKEDATA` fallback where the kernel refuses forced writes.

use super::*;

impl Session {
    /// Reads `buf.len()` bytes at `addr` (process_vm_readv, falling back to `/proc/PID/mem`).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), SessionError> {
        self.alive()?;
        let len = buf.len();
        if len == 0 {
            return Ok(());
        }
        let err = |source: std::io::Error| SessionError::Read { pid: self.pid, addr, len, source };
        let remote = [RemoteIoVec { base: addr as usize, len }];
        let first = match process_vm_readv(Pid::from_raw(self.pid), &mut [IoSliceMut::new(buf)], &remote) {
            Ok(n) if n == len => return Ok(()),
            Ok(n) => std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("only {n} bytes readable")),
            Err(e) => std::io::Error::from(e),
        };
        // process_vm_readv may be filtered (seccomp) or the range partly unreadable to it:
        // try /proc/PID/mem, but report the first error if that fails too.
        match &self.mem {
            Some(mem) if mem.read_exact_at(buf, addr).is_ok() => Ok(()),
            _ => Err(err(first)),
        }
    }

    /// Reads many small ranges with few system calls (`process_vm_readv` takes up to 1024
    /// of them at once); a range that cannot be read whole is left zeroed and reported
    /// false, so that one bad pointer does not hide the rest.
    pub fn read_many(&self, ranges: &mut [(u64, &mut [u8])]) -> Result<Vec<bool>, SessionError> {
        self.alive()?;
        let mut ok = vec![false; ranges.len()];
        for (chunk, oks) in ranges.chunks_mut(1024).zip(ok.chunks_mut(1024)) {
            let remote: Vec<RemoteIoVec> =
                chunk.iter().map(|(a, b)| RemoteIoVec { base: *a as usize, len: b.len() }).collect();
            let total: usize = remote.iter().map(|r| r.len).sum();
            let mut local: Vec<IoSliceMut<'_>> = chunk.iter_mut().map(|(_, b)| IoSliceMut::new(b)).collect();
            let n = process_vm_readv(Pid::from_raw(self.pid), &mut local, &remote).unwrap_or(0);
            drop(local);
            if n == total {
                oks.fill(true);
                continue;
            }
            // Partly unreadable: one at a time.
            for ((addr, buf), ok) in chunk.iter_mut().zip(oks.iter_mut()) {
                *ok = self.read(*addr, buf).is_ok();
                if !*ok {
                    buf.fill(0);
                }
            }
        }
        Ok(ok)
    }

    /// Writes `data` at `addr`, also into read-only text, and checks that it reads back the
    /// same. Writes through `/proc/PID/mem` (the kernel forces the write into a private copy of
    /// the page); where the kernel refuses that (`proc_mem.force_override`), falls back to
    /// PTRACE_POKEDATA read-modify-write of whole words.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), SessionError> {
        self.alive()?;
        if data.is_empty() {
            return Ok(());
        }
        let direct = match &self.mem {
            Some(mem) => mem.write_all_at(data, addr),
            None => Err(std::io::Error::from(Errno::EPERM)),
        };
        if direct.is_err() {
            self.write_poke(addr, data)?;
        }
        self.verify(addr, data)
    }

    pub(super) fn verify(&self, addr: u64, data: &[u8]) -> Result<(), SessionError> {
        let mut back = vec![0u8; data.len()];
        self.read(addr, &mut back)?;
        if back != data {
            return Err(SessionError::WriteMismatch { pid: self.pid, addr, len: data.len() });
        }
        Ok(())
    }

    /// PTRACE_PEEKDATA/POKEDATA read-modify-write of the words covering `[addr, addr+len)`,
    /// through any stopped thread. Words never reach past the page of the region's last byte.
    pub(super) fn write_poke(&mut self, addr: u64, data: &[u8]) -> Result<(), SessionError> {
        let pid = self.pid;
        let err = |e: Errno| SessionError::Write { pid, addr, len: data.len(), source: std::io::Error::from(e) };
        let tid = self
            .threads
            .iter()
            .find(|(_, t)| matches!(t.state, State::Stopped(_)))
            .map(|(tid, _)| *tid)
            .ok_or(SessionError::Exited { pid })?;
        let end = addr + data.len() as u64;
        let mut at = addr;
        while at < end {
            // An 8-byte window holding `at`, moved down when it would run past the page of the
            // region's last byte (the next page may be unmapped).
            let last_page_end = ((end - 1) | 0xfff) + 1;
            let word_addr = at.min(last_page_end.saturating_sub(8));
            let mut word = sys::peek(tid, word_addr).map_err(err)?.to_le_bytes();
            for (i, b) in word.iter_mut().enumerate() {
                let a = word_addr + i as u64;
                if a >= addr && a < end {
                    *b = data[(a - addr) as usize];
                }
            }
            sys::poke(tid, word_addr, u64::from_le_bytes(word)).map_err(err)?;
            at = word_addr + 8;
        }
        Ok(())
    }
}
