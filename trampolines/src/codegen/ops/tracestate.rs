//! The `tracestate` half of trace context: an incoming value is kept per trace (see
//! `ring_abi::tracestate`) and written after the `traceparent` of every outgoing request
//! of that trace, HTTP/1 line or HPACK field alike.

use super::*;
use ring_abi::tracestate as ts;

/// How an outgoing `tracestate` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Form {
    /// `tracestate: <value>\r\n`.
    Line,
    /// An HPACK literal without indexing, new name, no Huffman coding.
    Field,
}

/// Bytes the copy loops may write past a value (they move 8 at a time).
const OVERRUN: i32 = 8;

/// A value this long needs the HPACK integer's continuation bytes (7-bit prefix).
const H2_SHORT: i32 = 127;

impl Ops<'_> {
    fn pending_table(&self) -> u64 {
        self.ring.base + self.ring.layout.tracestate_offset() as u64
    }

    /// RAX, RCX = an incoming `tracestate` value and its length: kept in the goroutine's
    /// pending entry when it is 1 to 512 bytes of printable ASCII (so that no byte of it
    /// can end a header line where it is written out). Clobbers RAX, RCX, RSI, RDI, R8,
    /// R9, R11, R13.
    pub(super) fn stash_state_value(&self, a: &mut CodeAssembler, done: CodeLabel) -> Result<(), IcedError> {
        let mut check = a.create_label();
        a.test(rax, rax)?;
        a.je(done)?;
        a.test(rcx, rcx)?;
        a.jle(done)?;
        a.cmp(rcx, ts::MAX as i32)?;
        a.ja(done)?;
        a.xor(r9d, r9d)?;
        a.set_label(&mut check)?;
        a.movzx(r8d, byte_ptr(rax + r9))?;
        a.sub(r8d, 0x20)?;
        a.cmp(r8d, 0x7e - 0x20)?;
        a.ja(done)?;
        a.inc(r9)?;
        a.cmp(r9, rcx)?;
        a.jb(check)?;
        a.mov(rsi, rax)?;
        self.goid(a)?;
        a.mov(rdi, r11)?;
        a.and(edi, (ts::PENDING - 1) as u32)?;
        a.imul_3(rdi, rdi, ts::ENTRY as i32)?;
        a.mov(r8, self.pending_table())?;
        a.add(r8, rdi)?;
        // The key says "being written" until the value is whole (see adopt_tracestate).
        a.mov(rax, r11)?;
        a.bts(rax, 63)?;
        a.mov(qword_ptr(r8 + ts::KEY as i32), rax)?;
        a.mov(qword_ptr(r8 + ts::LEN as i32), rcx)?;
        self.stamp(a)?;
        a.mov(qword_ptr(r8 + ts::TSC as i32), rax)?;
        a.lea(rdi, qword_ptr(r8 + ts::VALUE as i32))?;
        a.rep().movsb()?;
        a.mov(qword_ptr(r8 + ts::KEY as i32), r11)
    }

    /// RAX = the time stamp counter. Clobbers R13 (RDX is kept).
    fn stamp(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.mov(r13, rdx)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(rdx, r13)
    }

    /// `out` = the first entry of the trace table set for the trace id at `[RDI +
    /// ctx::TRACE]`. Clobbers `scratch` and R9.
    fn trace_set(&self, a: &mut CodeAssembler, out: AsmRegister64, scratch: AsmRegister64) -> Result<(), IcedError> {
        a.mov(scratch, qword_ptr(rdi + ctx::TRACE as i32 + 24))?;
        a.mov(r9, 0x9e37_79b9_7f4a_7c15u64)?;
        a.imul_2(scratch, r9)?;
        a.shr(scratch, 64 - (ts::TRACES / ts::WAYS).trailing_zeros())?;
        a.imul_3(scratch, scratch, (ts::ENTRY * ts::WAYS) as i32)?;
        a.mov(out, self.pending_table() + (ts::PENDING * ts::ENTRY) as u64)?;
        a.add(out, scratch)
    }

    /// Falls through when the entry at `e` holds the trace id at `[RDI + ctx::TRACE]`,
    /// else jumps to `other`. Clobbers R9.
    fn same_trace(&self, a: &mut CodeAssembler, e: AsmRegister64, other: CodeLabel) -> Result<(), IcedError> {
        for k in (0..32).step_by(8) {
            a.mov(r9, qword_ptr(e + ts::TRACE as i32 + k))?;
            a.cmp(r9, qword_ptr(rdi + ctx::TRACE as i32 + k))?;
            a.jne(other)?;
        }
        Ok(())
    }

    /// `e` = the trace table entry of the trace at `[RDI + ctx::TRACE]`, or a jump to
    /// `missing`. Clobbers `scratch` and R9.
    fn find_trace(
        &self,
        a: &mut CodeAssembler,
        e: AsmRegister64,
        scratch: AsmRegister64,
        missing: CodeLabel,
    ) -> Result<(), IcedError> {
        let mut found = a.create_label();
        self.trace_set(a, e, scratch)?;
        for way in 0..ts::WAYS {
            let mut next = a.create_label();
            if way > 0 {
                a.add(e, ts::ENTRY as i32)?;
            }
            self.same_trace(a, e, next)?;
            a.jmp(found)?;
            a.set_label(&mut next)?;
        }
        a.jmp(missing)?;
        a.set_label(&mut found)
    }

    /// RBX = the room [`Ops::tracestate_out`] asks for the trace of the context entry at
    /// RDI (its longest field and the copy's overrun), 0 when the trace has no value: so
    /// that a frame is deferred to a larger buffer rather than sent without it. Clobbers
    /// R9, R11, R13.
    pub(super) fn tracestate_need(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let mut none = a.create_label();
        let mut end = a.create_label();
        self.find_trace(a, r13, r11, none)?;
        a.mov(rbx, qword_ptr(r13 + ts::LEN as i32))?;
        a.cmp(rbx, ts::MAX as i32)?;
        a.ja(none)?;
        a.add(rbx, 12 + 3 + OVERRUN)?;
        a.jmp(end)?;
        a.set_label(&mut none)?;
        a.xor(ebx, ebx)?;
        a.set_label(&mut end)
    }

    /// See [`Op::AdoptTracestate`]. The value goes to its trace's entry if the set has
    /// one, else replaces the set's least recently stored. A writer takes the entry by
    /// making its sequence word odd with `lock cmpxchg` (another writer at it: this value
    /// is lost) and makes it even again once the entry is whole.
    pub(super) fn adopt_tracestate(&self, a: &mut CodeAssembler, done: CodeLabel) -> Result<(), IcedError> {
        let (mut copy, mut chosen, mut oldest) = (a.create_label(), a.create_label(), a.create_label());
        self.goid(a)?;
        a.mov(rsi, r11)?;
        a.and(esi, (ts::PENDING - 1) as u32)?;
        a.imul_3(rsi, rsi, ts::ENTRY as i32)?;
        a.mov(r8, self.pending_table())?;
        a.add(rsi, r8)?;
        // Taken (the key from this goid to 0) atomically; a goroutine whose id shares the
        // entry and writes it meanwhile sets the key again, and the copy is then dropped.
        a.mov(rax, r11)?;
        a.xor(ecx, ecx)?;
        a.lock().cmpxchg(qword_ptr(rsi + ts::KEY as i32), rcx)?;
        a.jne(done)?;
        // R10 = now, for the freshness check and the entry's stamp.
        self.stamp(a)?;
        a.mov(r10, rax)?;
        a.sub(rax, qword_ptr(rsi + ts::TSC as i32))?;
        a.cmp(rax, ts::FRESH_TICKS as i32)?;
        a.ja(done)?;
        self.find(a, Table::Goroutines, done, Some(CtxState::Pending))?;
        // RBX = the trace's entry, or the set's oldest.
        self.find_trace(a, rbx, rcx, oldest)?;
        a.jmp(chosen)?;
        a.set_label(&mut oldest)?;
        self.trace_set(a, rbx, rcx)?;
        a.mov(r11, rbx)?;
        a.mov(rax, qword_ptr(rbx + ts::TSC as i32))?;
        for way in 1..ts::WAYS {
            let mut newer = a.create_label();
            let at = (way * ts::ENTRY) as i32;
            a.mov(r9, qword_ptr(rbx + at + ts::TSC as i32))?;
            a.cmp(r9, rax)?;
            a.jae(newer)?;
            a.mov(rax, r9)?;
            a.lea(r11, qword_ptr(rbx + at))?;
            a.set_label(&mut newer)?;
        }
        a.mov(rbx, r11)?;
        a.set_label(&mut chosen)?;
        a.mov(rax, qword_ptr(rbx + ts::KEY as i32))?;
        a.test(al, 1)?;
        a.jne(done)?;
        a.lea(rcx, qword_ptr(rax + 1))?;
        a.lock().cmpxchg(qword_ptr(rbx + ts::KEY as i32), rcx)?;
        a.jne(done)?;
        self.copy(a, (rdi, ctx::TRACE as i32), (rbx, ts::TRACE as i32), 32)?;
        a.mov(qword_ptr(rbx + ts::TSC as i32), r10)?;
        a.mov(rcx, qword_ptr(rsi + ts::LEN as i32))?;
        a.mov(qword_ptr(rbx + ts::LEN as i32), rcx)?;
        a.xor(r8d, r8d)?;
        a.set_label(&mut copy)?;
        a.mov(r9, qword_ptr(rsi + r8 + ts::VALUE as i32))?;
        a.mov(qword_ptr(rbx + r8 + ts::VALUE as i32), r9)?;
        a.add(r8, 8)?;
        a.cmp(r8, rcx)?;
        a.jb(copy)?;
        let mut whole = a.create_label();
        a.cmp(qword_ptr(rsi + ts::KEY as i32), 0)?;
        a.je(whole)?;
        a.mov(qword_ptr(rbx + ts::LEN as i32), 0)?;
        a.set_label(&mut whole)?;
        a.add(rax, 2)?;
        a.mov(qword_ptr(rbx + ts::KEY as i32), rax)
    }

    /// Writes the `tracestate` of the trace of the context entry at RDI at R10, when the
    /// trace table has one and it fits in R11 bytes (which must include [`OVERRUN`] bytes
    /// the copy may write past it, never committed). RBX = the bytes written, 0 when none:
    /// the caller commits them. A value a writer changed while it was copied is not
    /// committed. The record's word at `[R12 + note]` tells the collector: the bytes, 0
    /// for none, -1 for a value that did not fit. Keeps RAX, RSI, RDI, R8 and R10;
    /// clobbers RCX, R9, R11, R13.
    pub(super) fn tracestate_out(&self, a: &mut CodeAssembler, form: Form, note: i32) -> Result<(), IcedError> {
        let (mut none, mut end, mut no_room) = (a.create_label(), a.create_label(), a.create_label());
        self.find_trace(a, r13, rcx, none)?;
        // The sequence word, then the trace again: the entry may have been another's
        // between the search and here.
        a.mov(rbx, qword_ptr(r13 + ts::KEY as i32))?;
        a.test(bl, 1)?;
        a.jne(none)?;
        self.same_trace(a, r13, none)?;
        a.mov(rcx, qword_ptr(r13 + ts::LEN as i32))?;
        a.test(rcx, rcx)?;
        a.je(none)?;
        a.cmp(rcx, ts::MAX as i32)?;
        a.ja(none)?;
        // Both forms start with the name: `tracestate: ` or 0x00, 10, `tracestate`.
        let name_at = match form {
            Form::Line => 0,
            Form::Field => 2,
        };
        match form {
            Form::Line => {
                a.lea(r9, qword_ptr(rcx + 12 + 2 + OVERRUN))?;
                a.cmp(r9, r11)?;
                a.ja(no_room)?;
                a.mov(r11, rcx)?;
                a.mov(dword_ptr(r10 + 8), u32::from_le_bytes(*b"te: "))?;
            }
            Form::Field => {
                // Room for the longer integer: a short value then needs 2 bytes less.
                a.lea(r9, qword_ptr(rcx + 12 + 3 + OVERRUN))?;
                a.cmp(r9, r11)?;
                a.ja(no_room)?;
                a.mov(r11, rcx)?;
                a.mov(word_ptr(r10), u32::from(u16::from_le_bytes([0x00, 10])))?;
                a.mov(word_ptr(r10 + 10), u32::from(u16::from_le_bytes(*b"te")))?;
            }
        }
        a.mov(r9, u64::from_le_bytes(*b"tracesta"))?;
        a.mov(qword_ptr(r10 + name_at), r9)?;
        // The value after its prefix at `at`; RBX (the sequence word read) is checked
        // again after the copy, then becomes the field's length.
        let value = |a: &mut CodeAssembler, at: i32, tail: i32| -> Result<(), IcedError> {
            let mut lp = a.create_label();
            a.xor(ecx, ecx)?;
            a.set_label(&mut lp)?;
            a.mov(r9, qword_ptr(r13 + rcx + ts::VALUE as i32))?;
            a.mov(qword_ptr(r10 + rcx + at), r9)?;
            a.add(rcx, 8)?;
            a.cmp(rcx, r11)?;
            a.jb(lp)?;
            if tail > 0 {
                a.mov(word_ptr(r10 + r11 + at), u32::from(u16::from_le_bytes(*b"\r\n")))?;
            }
            a.cmp(qword_ptr(r13 + ts::KEY as i32), rbx)?;
            a.jne(none)?;
            a.lea(rbx, qword_ptr(r11 + at + tail))?;
            a.mov(qword_ptr(r12 + note), rbx)?;
            a.jmp(end)
        };
        match form {
            Form::Line => value(a, 12, 2)?,
            Form::Field => {
                let mut long = a.create_label();
                a.cmp(r11, H2_SHORT)?;
                a.jae(long)?;
                a.mov(byte_ptr(r10 + 12), r11b)?;
                value(a, 13, 0)?;
                a.set_label(&mut long)?;
                // 127, then len - 127 in 7-bit groups, low first, the high bit set on all
                // but the last (at most 385: two groups).
                let mut longer = a.create_label();
                a.mov(byte_ptr(r10 + 12), 0x7fu32)?;
                a.lea(r9, qword_ptr(r11 - H2_SHORT))?;
                a.cmp(r9, 0x80)?;
                a.jae(longer)?;
                a.mov(byte_ptr(r10 + 13), r9b)?;
                value(a, 14, 0)?;
                a.set_label(&mut longer)?;
                a.mov(rcx, r9)?;
                a.or(ecx, 0x80)?;
                a.mov(byte_ptr(r10 + 13), cl)?;
                a.shr(r9d, 7)?;
                a.mov(byte_ptr(r10 + 14), r9b)?;
                value(a, 15, 0)?;
            }
        }
        a.set_label(&mut no_room)?;
        a.mov(qword_ptr(r12 + note), -1)?;
        a.xor(ebx, ebx)?;
        a.jmp(end)?;
        a.set_label(&mut none)?;
        a.xor(ebx, ebx)?;
        a.mov(qword_ptr(r12 + note), rbx)?;
        a.set_label(&mut end)
    }
}
