//! The plan's operations inside a won slot: field reads through pointers, byte copies,
//! and the trace-context operations (span ids, `traceparent` in and out, goroutine
//! lineage) that must happen in the target before the collector could see anything.

use super::*;

mod auto;
mod h1;
mod h2;
mod kafka;
mod tracestate;

/// Bytes of an [`Op::InjectH2After`] record's data: flag, span id, tracestate word, scratch.
pub(super) const H2_AFTER_DATA: usize = h2::SCRATCH + 16;

use tracestate::Form;

/// Emits [`Op`]s. Runs inside the won-slot block: R12 is the slot, every integer argument
/// register is saved in it (and restored after), RAX is parked in X15. Free here: RAX,
/// RBX, RCX, RSI, RDI, R8-R11 and R13. RDX (the closure context) is never touched but
/// around RDTSC.
pub(super) struct Ops<'r> {
    pub(super) ring: &'r RingAddrs,
    /// Displacement from R12 of the slot's data area and of its saved registers.
    pub(super) slot_data: i32,
    pub(super) ints: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    Goroutines,
    Requests,
}

pub(super) use ctx::W3C_LINE;

/// `itab.fun[0]`: after `inter`, `_type`, `hash` and padding, in every Go release since 1.0.
pub(super) const ITAB_FUN0: i32 = 24;

impl Ops<'_> {
    fn data(&self, dest: u16, off: usize) -> AsmMemoryOperand {
        qword_ptr(r12 + self.dest(dest, off))
    }
    fn dest(&self, dest: u16, off: usize) -> i32 {
        self.slot_data + dest as i32 + off as i32
    }
    fn reg(&self, i: u8) -> AsmMemoryOperand {
        qword_ptr(r12 + self.ints + 8 * i32::from(i))
    }
    /// RSI = the saved register `r`, or the stack pointer for [`super::SP`].
    fn load(&self, a: &mut CodeAssembler, r: u8) -> Result<(), IcedError> {
        if r == super::SP { a.mov(rsi, rsp) } else { a.mov(rsi, self.reg(r)) }
    }
    fn goroutines(&self) -> u64 {
        self.ring.base + self.ring.layout.ctx_offset() as u64
    }

    pub(super) fn emit(&self, a: &mut CodeAssembler, op: &Op) -> Result<(), IcedError> {
        let mut done = a.create_label();
        match op {
            Op::Field(f) => self.field(a, f, done)?,
            Op::StashTraceparent { ptr, len } => self.stash(a, *ptr, *len, done)?,
            Op::ServerBegin { dest } => {
                self.begin_span(a, *dest, CtxState::Pending, ParentKind::Remote)?;
                self.goid(a)?;
                self.place(a, Table::Goroutines, None)?;
                self.publish(a, *dest)?;
            }
            Op::ServerEnd | Op::Forget => {
                self.goid(a)?;
                self.find(a, Table::Goroutines, done, None)?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
            }
            Op::ClientBegin { req, header_off, dest } => {
                self.begin_span(a, *dest, CtxState::Active, ParentKind::Local)?;
                // The request table entry, keyed by the request's header map.
                a.mov(r11, self.reg(*req))?;
                a.test(r11, r11)?;
                a.je(done)?;
                a.mov(r11, qword_ptr(r11 + *header_off))?;
                a.test(r11, r11)?;
                a.je(done)?;
                self.place(a, Table::Requests, None)?;
                self.publish(a, *dest)?;
            }
            Op::InjectTraceparent { map, itab, data, write_fn, buf_off, n_off, dest } => {
                self.inject_line(a, [*map, *itab, *data], *write_fn, *buf_off, *n_off, *dest, done)?
            }
            Op::UndoOwnTraceparent { buf_off, n_off, dest } => self.undo_own_line(a, *buf_off, *n_off, *dest, done)?,
            Op::StashTraceparentField { name_ptr, name_len, value_ptr, value_len } => {
                let mut state = a.create_label();
                self.name_is_traceparent(a, *name_ptr, *name_len, state)?;
                a.mov(rax, self.reg(*value_ptr))?;
                a.mov(rcx, self.reg(*value_len))?;
                self.stash_value(a, done)?;
                a.jmp(done)?;
                // Or a `tracestate` (HTTP/2 field names are lowercase).
                a.set_label(&mut state)?;
                a.cmp(self.reg(*name_len), 10)?;
                a.jne(done)?;
                a.mov(rsi, self.reg(*name_ptr))?;
                a.test(rsi, rsi)?;
                a.je(done)?;
                a.mov(rax, u64::from_le_bytes(*b"tracesta"))?;
                a.cmp(qword_ptr(rsi), rax)?;
                a.jne(done)?;
                a.cmp(word_ptr(rsi + 8), i32::from(u16::from_le_bytes(*b"te")))?;
                a.jne(done)?;
                a.mov(rax, self.reg(*value_ptr))?;
                a.mov(rcx, self.reg(*value_len))?;
                self.stash_state_value(a, done)?;
            }
            Op::AdoptTracestate => self.adopt_tracestate(a, done)?,
            Op::PendingToRequest { key } => {
                self.goid(a)?;
                self.find(a, Table::Goroutines, done, Some(CtxState::Pending))?;
                a.mov(rsi, rdi)?;
                a.mov(r11, self.reg(*key))?;
                a.test(r11, r11)?;
                a.je(done)?;
                self.move_entry(a, Table::Requests)?;
            }
            Op::PendingFromRequest { key } => {
                a.mov(r11, self.reg(*key))?;
                a.test(r11, r11)?;
                a.je(done)?;
                self.find(a, Table::Requests, done, Some(CtxState::Pending))?;
                a.mov(rsi, rdi)?;
                self.goid(a)?;
                self.move_entry(a, Table::Goroutines)?;
            }
            Op::ClearPending => {
                self.goid(a)?;
                self.find(a, Table::Goroutines, done, Some(CtxState::Pending))?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
            }
            Op::ClientBeginHere { dest } => {
                self.begin_span(a, *dest, CtxState::Active, ParentKind::Local)?;
                self.tagged_goid(a, ctx::CLIENT_TAG_BIT)?;
                self.place(a, Table::Goroutines, None)?;
                self.publish(a, *dest)?;
            }
            Op::ChildSpan { dest } => self.begin_span(a, *dest, CtxState::Active, ParentKind::Local)?,
            Op::StandDown { name_ptr, name_len, dest } => {
                a.mov(self.data(*dest, 0), 0)?;
                self.name_is_traceparent(a, *name_ptr, *name_len, done)?;
                self.tagged_goid(a, ctx::OUT_TAG_BIT)?;
                self.find(a, Table::Goroutines, done, None)?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
                a.mov(self.data(*dest, 0), 1)?;
            }
            Op::ClientEndHere => self.forget_tagged(a, ctx::CLIENT_TAG_BIT, done)?,
            Op::ClientToRequest { key } => {
                self.tagged_goid(a, ctx::CLIENT_TAG_BIT)?;
                self.find(a, Table::Goroutines, done, Some(CtxState::Active))?;
                a.mov(rsi, rdi)?;
                a.mov(r11, self.reg(*key))?;
                a.test(r11, r11)?;
                a.je(done)?;
                self.move_entry(a, Table::Requests)?;
            }
            Op::OutgoingFromRequest { key, deref } => {
                // A span left over (its headers never written) must not name the next.
                let mut clean = a.create_label();
                self.tagged_goid(a, ctx::OUT_TAG_BIT)?;
                self.find(a, Table::Goroutines, clean, None)?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
                a.set_label(&mut clean)?;
                a.mov(r11, self.reg(*key))?;
                if let Some(off) = deref {
                    a.test(r11, r11)?;
                    a.je(done)?;
                    a.mov(r11, qword_ptr(r11 + *off))?;
                }
                a.test(r11, r11)?;
                a.je(done)?;
                self.find(a, Table::Requests, done, Some(CtxState::Active))?;
                a.mov(rsi, rdi)?;
                self.tagged_goid(a, ctx::OUT_TAG_BIT)?;
                // Moved, not copied: a later request at the same address is another one.
                self.move_entry(a, Table::Goroutines)?;
            }
            Op::InjectH2 { framer, wbuf_off, after, dest } => {
                self.inject_h2(a, *framer, *wbuf_off, *after, *dest, done)?
            }
            Op::InjectH2After { wbuf_off, after, dest } => self.inject_h2_after(a, *wbuf_off, after, *dest, done)?,
            Op::KafkaSlot { dest } => self.kafka_slot(a, *dest)?,
            Op::KafkaEnd => self.forget_tagged(a, ctx::KAFKA_TAG_BIT, done)?,
            Op::KafkaHeader { headers, dest } => self.kafka_header(a, *headers, *dest, done)?,
            Op::ConsumeBegin { headers, dest } => self.consume_begin(a, *headers, *dest, done)?,
            Op::ConsumeEnd => self.consume_end(a, done)?,
            Op::Stack { n, dest } => self.stack(a, *n, *dest)?,
            Op::AutoEnable { flag } => self.auto_enable(a, *flag, done)?,
            Op::AutoStart { span, psc, sampled, sc, dest } => {
                self.auto_start(a, [*span, *psc, *sampled, *sc], *dest, done)?
            }
            Op::AutoEnd { span } => self.auto_end(a, *span, done)?,
            Op::Inherit { g, goid_off, parent_goid_off } => {
                let mut inherit = a.create_label();
                a.mov(rax, self.reg(*g))?;
                a.test(rax, rax)?;
                a.je(done)?;
                a.mov(r11, qword_ptr(rax + *parent_goid_off))?;
                // An active span, or an incoming context not yet started (HTTP/2 starts
                // each handler on a goroutine of its own).
                self.find(a, Table::Goroutines, done, None)?;
                a.cmp(qword_ptr(rdi + ctx::STATE as i32), CtxState::Active as i32)?;
                a.je(inherit)?;
                a.cmp(qword_ptr(rdi + ctx::STATE as i32), CtxState::Pending as i32)?;
                a.jne(done)?;
                a.set_label(&mut inherit)?;
                a.mov(rsi, rdi)?;
                a.mov(rax, self.reg(*g))?;
                a.mov(r11, qword_ptr(rax + *goid_off))?;
                self.place(a, Table::Goroutines, Some(rsi))?;
                self.copy(a, (rsi, 0), (rdi, 0), ctx::ENTRY)?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
            }
        }
        a.set_label(&mut done)?;
        Ok(())
    }

    /// Writes a new span's ids at `dest`: a child of the goroutine's context when its
    /// entry is in `state` (the parent recorded as `kind`), else the root of a new trace.
    fn begin_span(&self, a: &mut CodeAssembler, dest: u16, state: CtxState, kind: ParentKind) -> Result<(), IcedError> {
        let mut fresh = a.create_label();
        let mut span = a.create_label();
        self.goid(a)?;
        self.find(a, Table::Goroutines, fresh, Some(state))?;
        self.copy(a, (rdi, ctx::TRACE as i32), (r12, self.dest(dest, span_ids::TRACE)), 32)?;
        self.copy(a, (rdi, ctx::SPAN as i32), (r12, self.dest(dest, span_ids::PARENT)), 16)?;
        a.mov(self.data(dest, span_ids::PARENT_KIND), kind as i32)?;
        if state == CtxState::Active || self.ring.sampling.parent_based {
            // A local parent decided already; a remote one decides for parent-based samplers.
            self.copy(a, (rdi, ctx::FLAGS as i32), (r12, self.dest(dest, span_ids::FLAGS)), 8)?;
        } else {
            self.trace_low(a, (rdi, ctx::TRACE as i32 + 16))?;
            self.decide(a, dest)?;
        }
        a.jmp(span)?;
        a.set_label(&mut fresh)?;
        self.new_trace(a, dest)?;
        a.set_label(&mut span)?;
        self.new_span(a, dest)
    }

    /// Moves the entry at RSI to key R11 of table `t` (another table than RSI's): RDI =
    /// the new entry; the old one is freed. Clobbers RAX, R8, R9.
    fn move_entry(&self, a: &mut CodeAssembler, t: Table) -> Result<(), IcedError> {
        self.place(a, t, None)?;
        self.copy(a, (rsi, 0), (rdi, 0), ctx::ENTRY)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
        a.mov(qword_ptr(rsi + ctx::KEY as i32), 0)
    }

    /// Goes on only when the saved (pointer, length) registers name an HTTP/2 field
    /// `traceparent` (HTTP/2 field names are lowercase), else jumps to `done`. Clobbers
    /// RAX and RSI.
    fn name_is_traceparent(
        &self,
        a: &mut CodeAssembler,
        name_ptr: u8,
        name_len: u8,
        done: CodeLabel,
    ) -> Result<(), IcedError> {
        is_traceparent(a, self.reg(name_ptr), self.reg(name_len), done)
    }

    /// R11 = the goid.
    fn goid(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.mov(r11, qword_ptr(r14 + self.ring.goid_offset as i32))
    }

    /// Frees the goroutine's entry under its key tagged with `bit`, if it has one.
    fn forget_tagged(&self, a: &mut CodeAssembler, bit: u32, done: CodeLabel) -> Result<(), IcedError> {
        self.tagged_goid(a, bit)?;
        self.find(a, Table::Goroutines, done, None)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)
    }

    /// R11 = the goid with `bit` set: a key of the goroutine's own set.
    fn tagged_goid(&self, a: &mut CodeAssembler, bit: u32) -> Result<(), IcedError> {
        self.goid(a)?;
        a.bts(r11, bit)
    }

    /// RDI = the first entry of the set for key R11. Clobbers R8.
    fn set_of(&self, a: &mut CodeAssembler, t: Table) -> Result<(), IcedError> {
        match t {
            Table::Requests => request_set(a, self.ring, rdi, r8, r11),
            Table::Goroutines => {
                // Goroutine ids are consecutive: their low bits already spread.
                let sets = ctx::GOROUTINES / ctx::WAYS;
                a.mov(rdi, r11)?;
                a.and(edi, (sets - 1) as u32)?;
                a.shl(rdi, (ctx::ENTRY * ctx::WAYS).trailing_zeros())?;
                a.mov(r8, self.goroutines())?;
                a.add(rdi, r8)
            }
        }
    }

    /// RDI = the entry with key R11 (and `state`, if given), or a jump to `missing`.
    fn find(
        &self,
        a: &mut CodeAssembler,
        t: Table,
        missing: CodeLabel,
        state: Option<CtxState>,
    ) -> Result<(), IcedError> {
        let mut found = a.create_label();
        self.set_of(a, t)?;
        for way in 0..ctx::WAYS {
            if way > 0 {
                a.add(rdi, ctx::ENTRY as i32)?;
            }
            a.cmp(qword_ptr(rdi + ctx::KEY as i32), r11)?;
            a.je(found)?;
        }
        a.jmp(missing)?;
        a.set_label(&mut found)?;
        if let Some(s) = state {
            a.cmp(qword_ptr(rdi + ctx::STATE as i32), s as i32)?;
            a.jne(missing)?;
        }
        Ok(())
    }

    /// RDI = where key R11 goes: its own entry, else a free one, else the first way (not
    /// `keep`, an entry the caller still reads). Clobbers RAX, R8.
    fn place(&self, a: &mut CodeAssembler, t: Table, keep: Option<AsmRegister64>) -> Result<(), IcedError> {
        let mut chosen = a.create_label();
        self.set_of(a, t)?;
        a.mov(rax, rdi)?;
        for wanted in [Some(()), None] {
            for way in 0..ctx::WAYS {
                let at = (way * ctx::ENTRY + ctx::KEY) as i32;
                match wanted {
                    Some(()) => a.cmp(qword_ptr(rax + at), r11)?,
                    None => a.cmp(qword_ptr(rax + at), 0)?,
                }
                a.lea(rdi, qword_ptr(rax + (way * ctx::ENTRY) as i32))?;
                a.je(chosen)?;
            }
        }
        // A full set: evict the first way, or the second when the first is `keep`.
        a.mov(rdi, rax)?;
        if let Some(k) = keep {
            a.cmp(rdi, k)?;
            a.jne(chosen)?;
            a.add(rdi, ctx::ENTRY as i32)?;
        }
        a.set_label(&mut chosen)
    }

    /// Copies `n` (a multiple of 8) bytes through R9.
    fn copy(
        &self,
        a: &mut CodeAssembler,
        from: (AsmRegister64, i32),
        to: (AsmRegister64, i32),
        n: usize,
    ) -> Result<(), IcedError> {
        for k in (0..n as i32).step_by(8) {
            a.mov(r9, qword_ptr(from.0 + from.1 + k))?;
            a.mov(qword_ptr(to.0 + to.1 + k), r9)?;
        }
        Ok(())
    }

    /// Marks the entry at RDI (key R11) active with the record's ids.
    fn publish(&self, a: &mut CodeAssembler, dest: u16) -> Result<(), IcedError> {
        a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
        a.mov(qword_ptr(rdi + ctx::STATE as i32), CtxState::Active as i32)?;
        self.copy(a, (r12, self.dest(dest, span_ids::TRACE)), (rdi, ctx::TRACE as i32), 32)?;
        self.copy(a, (r12, self.dest(dest, span_ids::SPAN)), (rdi, ctx::SPAN as i32), 16)?;
        self.copy(a, (r12, self.dest(dest, span_ids::FLAGS)), (rdi, ctx::FLAGS as i32), 8)
    }

    fn new_trace(&self, a: &mut CodeAssembler, dest: u16) -> Result<(), IcedError> {
        self.random(a)?;
        self.hex(a, self.dest(dest, span_ids::TRACE))?;
        self.random(a)?;
        // The low 64 bits of the trace id: the root's sampling decision.
        a.mov(rcx, rax)?;
        self.decide(a, dest)?;
        self.hex(a, self.dest(dest, span_ids::TRACE + 16))?;
        a.mov(self.data(dest, span_ids::PARENT), 0)?;
        a.mov(self.data(dest, span_ids::PARENT + 8), 0)?;
        a.mov(self.data(dest, span_ids::PARENT_KIND), ParentKind::None as i32)
    }

    /// Writes the span's flags at `dest` as the sampler decides for a trace id whose low
    /// 64 bits are in RCX. Clobbers RCX, R8.
    fn decide(&self, a: &mut CodeAssembler, dest: u16) -> Result<(), IcedError> {
        let flags = |f: &[u8; 2]| i32::from(u16::from_le_bytes(*f));
        let below = self.ring.sampling.root_below;
        if below == u64::MAX || below == 0 {
            return a.mov(self.data(dest, span_ids::FLAGS), flags(if below == 0 { b"00" } else { b"01" }));
        }
        let (mut out, mut end) = (a.create_label(), a.create_label());
        a.shr(rcx, 1)?;
        a.mov(r8, below)?;
        a.cmp(rcx, r8)?;
        a.jae(out)?;
        a.mov(self.data(dest, span_ids::FLAGS), flags(b"01"))?;
        a.jmp(end)?;
        a.set_label(&mut out)?;
        a.mov(self.data(dest, span_ids::FLAGS), flags(b"00"))?;
        a.set_label(&mut end)
    }

    /// RCX = the 16 lowercase hex digits at `[from]` (a trace id's low half), read.
    /// Clobbers R8, R9.
    fn trace_low(&self, a: &mut CodeAssembler, from: (AsmRegister64, i32)) -> Result<(), IcedError> {
        a.xor(ecx, ecx)?;
        for i in 0..16 {
            // '0'-'9' (0x3_) and 'a'-'f' (0x6_): the low nibble, plus 9 for letters.
            a.movzx(r8d, byte_ptr(from.0 + from.1 + i))?;
            a.mov(r9d, r8d)?;
            a.shr(r9d, 6)?;
            a.lea(r9d, dword_ptr(r9 + r9 * 8))?;
            a.and(r8d, 15)?;
            a.add(r8d, r9d)?;
            a.shl(rcx, 4)?;
            a.or(rcx, r8)?;
        }
        Ok(())
    }

    /// Writes the entry at RDI's flags, two hex digits, at `[R8 + at]` (`01` for an
    /// entry that has none). Clobbers R9.
    fn write_flags(&self, a: &mut CodeAssembler, at: i32) -> Result<(), IcedError> {
        let mut set = a.create_label();
        a.movzx(r9d, word_ptr(rdi + ctx::FLAGS as i32))?;
        a.test(r9d, r9d)?;
        a.jne(set)?;
        a.mov(r9d, u32::from(u16::from_le_bytes(*b"01")))?;
        a.set_label(&mut set)?;
        a.mov(word_ptr(r8 + at), r9w)
    }

    fn new_span(&self, a: &mut CodeAssembler, dest: u16) -> Result<(), IcedError> {
        self.random(a)?;
        self.hex(a, self.dest(dest, span_ids::SPAN))
    }

    /// RAX = a fresh, non-zero 64-bit id: the time stamp counter and the slot's address
    /// (distinct for writers at the same instant), salted per ring and mixed (splitmix64's
    /// finaliser). Clobbers RCX, RSI, R13.
    fn random(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.mov(r13, rdx)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(rdx, r13)?;
        a.add_instruction(Instruction::with2(
            Code::Xor_r64_rm64,
            Register::RAX,
            rip_mem(self.ring.base + header::SALT as u64),
        )?)?;
        a.mov(rcx, r12)?;
        a.rol(rcx, 32)?;
        a.xor(rax, rcx)?;
        for (shift, mul) in [(30, 0xbf58_476d_1ce4_e5b9u64), (27, 0x94d0_49bb_1331_11eb)] {
            a.mov(rsi, rax)?;
            a.shr(rsi, shift)?;
            a.xor(rax, rsi)?;
            a.mov(rcx, mul)?;
            a.imul_2(rax, rcx)?;
        }
        a.mov(rsi, rax)?;
        a.shr(rsi, 31)?;
        a.xor(rax, rsi)?;
        a.or(rax, 1)
    }

    /// Writes RAX as 16 lowercase hex digits at `[R12 + disp]`. Clobbers R8, R9.
    fn hex(&self, a: &mut CodeAssembler, disp: i32) -> Result<(), IcedError> {
        for i in 0..16 {
            a.mov(r8, rax)?;
            a.shr(r8, 60 - 4 * i)?;
            a.and(r8d, 15)?;
            // '0' + n, plus 39 more ('a' - '0' - 10) when n > 9.
            a.lea(r9d, dword_ptr(r8 + 6))?;
            a.shr(r9d, 4)?;
            a.imul_3(r9d, r9d, 39)?;
            a.lea(r8d, dword_ptr(r8 + r9 + 48))?;
            a.mov(byte_ptr(r12 + disp + i), r8b)?;
        }
        Ok(())
    }

    /// See [`Op::Stack`]. Reads RBP, RSP and R14 (`g.stack` is the first field of
    /// `runtime.g`: lo, then hi).
    fn stack(&self, a: &mut CodeAssembler, n: u8, dest: u16) -> Result<(), IcedError> {
        let (mut each, mut end) = (a.create_label(), a.create_label());
        a.mov(rax, qword_ptr(rsp))?;
        a.mov(self.data(dest, 8), rax)?;
        a.mov(r11d, 1)?;
        a.mov(rax, rbp)?;
        a.mov(rcx, qword_ptr(r14))?;
        a.mov(r8, qword_ptr(r14 + self.ring.stack_hi_offset as i32))?;
        a.set_label(&mut each)?;
        a.cmp(r11d, u32::from(n))?;
        a.jae(end)?;
        a.test(al, 7)?;
        a.jne(end)?;
        a.cmp(rax, rcx)?;
        a.jb(end)?;
        a.lea(r9, qword_ptr(rax + 16))?;
        a.cmp(r9, r8)?;
        a.ja(end)?;
        a.mov(r9, qword_ptr(rax + 8))?;
        a.mov(qword_ptr(r12 + r11 * 8 + self.dest(dest, 8)), r9)?;
        a.inc(r11d)?;
        a.mov(r10, qword_ptr(rax))?;
        a.cmp(r10, rax)?;
        a.jbe(end)?;
        a.mov(rax, r10)?;
        a.jmp(each)?;
        a.set_label(&mut end)?;
        a.mov(self.data(dest, 0), r11)
    }

    fn field(&self, a: &mut CodeAssembler, f: &FieldCopy, done: CodeLabel) -> Result<(), IcedError> {
        let mut null = a.create_label();
        let miss = if f.keep_on_miss { done } else { null };
        for w in &f.when {
            self.load(a, w.reg)?;
            for &p in &w.path {
                a.test(rsi, rsi)?;
                a.je(miss)?;
                a.mov(rsi, qword_ptr(rsi + p))?;
            }
            if let Some(off) = w.off {
                a.test(rsi, rsi)?;
                a.je(miss)?;
                if w.byte {
                    a.movzx(esi, byte_ptr(rsi + off))?;
                } else {
                    a.mov(rsi, qword_ptr(rsi + off))?;
                }
            }
            a.mov(rax, w.equals)?;
            a.cmp(rsi, rax)?;
            if w.above {
                a.jbe(miss)?;
            } else if w.differs {
                a.je(miss)?;
            } else {
                a.jne(miss)?;
            }
        }
        self.load(a, f.reg)?;
        for &p in &f.path {
            a.test(rsi, rsi)?;
            a.je(null)?;
            a.mov(rsi, qword_ptr(rsi + p))?;
        }
        a.test(rsi, rsi)?;
        a.je(null)?;
        match f.fetch {
            Fetch::Word => {
                a.mov(rax, qword_ptr(rsi + f.off))?;
                a.mov(self.data(f.dest, 0), rax)?;
            }
            Fetch::Str { max } => {
                let mut short = a.create_label();
                a.mov(rcx, qword_ptr(rsi + f.off + 8))?;
                a.mov(rsi, qword_ptr(rsi + f.off))?;
                a.test(rcx, rcx)?;
                a.jle(null)?;
                a.test(rsi, rsi)?;
                a.je(null)?;
                a.mov(self.data(f.dest, 0), rcx)?;
                a.cmp(rcx, i32::from(max))?;
                a.jbe(short)?;
                a.mov(ecx, u32::from(max))?;
                a.set_label(&mut short)?;
                a.lea(rdi, qword_ptr(r12 + self.dest(f.dest, 8)))?;
                a.rep().movsb()?;
            }
        }
        a.jmp(done)?;
        a.set_label(&mut null)?;
        a.mov(self.data(f.dest, 0), 0)
    }

    /// `Traceparent: 00-<32 hex>-<16 hex>-<2 hex>` (any case for the name, one optional
    /// space) becomes the goroutine's pending context. Only bytes inside the line are read.
    fn stash(&self, a: &mut CodeAssembler, ptr: u8, len: u8, done: CodeLabel) -> Result<(), IcedError> {
        let mut state = a.create_label();
        a.mov(rsi, self.reg(ptr))?;
        a.mov(rcx, self.reg(len))?;
        a.test(rsi, rsi)?;
        a.je(done)?;
        a.cmp(rcx, 12 + 55)?;
        a.jl(state)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(r8, 0x2020_2020_2020_2020u64)?;
        a.or(rax, r8)?;
        a.mov(r8, u64::from_le_bytes(*b"tracepar"))?;
        a.cmp(rax, r8)?;
        a.jne(state)?;
        a.mov(eax, dword_ptr(rsi + 7))?;
        a.or(eax, 0x2020_2020)?;
        a.cmp(eax, u32::from_le_bytes(*b"rent") as i32)?;
        a.jne(state)?;
        a.cmp(byte_ptr(rsi + 11), i32::from(b':'))?;
        a.jne(state)?;
        let mut value = a.create_label();
        a.lea(rax, qword_ptr(rsi + 12))?;
        a.sub(rcx, 12)?;
        a.cmp(byte_ptr(rax), i32::from(b' '))?;
        a.jne(value)?;
        a.inc(rax)?;
        a.dec(rcx)?;
        a.set_label(&mut value)?;
        self.stash_value(a, done)?;
        a.jmp(done)?;
        // `Tracestate:` (any case), optional spaces or tabs, the value.
        let (mut skip, mut ows, mut val) = (a.create_label(), a.create_label(), a.create_label());
        a.set_label(&mut state)?;
        a.cmp(rcx, 12)?;
        a.jl(done)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(r8, 0x2020_2020_2020_2020u64)?;
        a.or(rax, r8)?;
        a.mov(r8, u64::from_le_bytes(*b"tracesta"))?;
        a.cmp(rax, r8)?;
        a.jne(done)?;
        a.movzx(eax, word_ptr(rsi + 8))?;
        a.or(eax, 0x2020)?;
        a.cmp(eax, i32::from(u16::from_le_bytes(*b"te")))?;
        a.jne(done)?;
        a.cmp(byte_ptr(rsi + 10), i32::from(b':'))?;
        a.jne(done)?;
        a.lea(rax, qword_ptr(rsi + 11))?;
        a.sub(rcx, 11)?;
        a.set_label(&mut ows)?;
        a.test(rcx, rcx)?;
        a.je(done)?;
        a.cmp(byte_ptr(rax), i32::from(b' '))?;
        a.je(skip)?;
        a.cmp(byte_ptr(rax), i32::from(b'\t'))?;
        a.jne(val)?;
        a.set_label(&mut skip)?;
        a.inc(rax)?;
        a.dec(rcx)?;
        a.jmp(ows)?;
        a.set_label(&mut val)?;
        self.stash_state_value(a, done)
    }

    /// RAX, RCX = a `traceparent` value and its length: when it is version 00 and well
    /// formed, it becomes the goroutine's pending context.
    fn stash_value(&self, a: &mut CodeAssembler, done: CodeLabel) -> Result<(), IcedError> {
        a.test(rax, rax)?;
        a.je(done)?;
        a.cmp(rcx, 55)?;
        a.jl(done)?;
        a.cmp(word_ptr(rax), i32::from(u16::from_le_bytes(*b"00")))?;
        a.jne(done)?;
        for at in [2, 35, 52] {
            a.cmp(byte_ptr(rax + at), i32::from(b'-'))?;
            a.jne(done)?;
        }
        // The flags are two lowercase hex digits: sent on as they came.
        for at in [53, 54] {
            let mut digit = a.create_label();
            a.movzx(r9d, byte_ptr(rax + at))?;
            a.lea(r8d, dword_ptr(r9 - i32::from(b'0')))?;
            a.cmp(r8d, 9)?;
            a.jbe(digit)?;
            a.lea(r8d, dword_ptr(r9 - i32::from(b'a')))?;
            a.cmp(r8d, 5)?;
            a.ja(done)?;
            a.set_label(&mut digit)?;
        }
        a.mov(rsi, rax)?;
        self.goid(a)?;
        self.place(a, Table::Goroutines, None)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
        a.mov(qword_ptr(rdi + ctx::STATE as i32), CtxState::Pending as i32)?;
        self.copy(a, (rsi, 3), (rdi, ctx::TRACE as i32), 32)?;
        self.copy(a, (rsi, 36), (rdi, ctx::SPAN as i32), 16)?;
        a.movzx(r9d, word_ptr(rsi + 53))?;
        a.mov(qword_ptr(rdi + ctx::FLAGS as i32), r9)
    }
}

/// Goes on only when the string whose pointer and length are at `ptr` and `len` is exactly
/// `traceparent`, else jumps to `miss`; only its 11 bytes are read. Clobbers RAX and RSI.
pub(super) fn is_traceparent(
    a: &mut CodeAssembler,
    ptr: AsmMemoryOperand,
    len: AsmMemoryOperand,
    miss: CodeLabel,
) -> Result<(), IcedError> {
    a.cmp(len, 11)?;
    a.jne(miss)?;
    a.mov(rsi, ptr)?;
    a.test(rsi, rsi)?;
    a.je(miss)?;
    a.mov(rax, u64::from_le_bytes(*b"tracepar"))?;
    a.cmp(qword_ptr(rsi), rax)?;
    a.jne(miss)?;
    a.cmp(dword_ptr(rsi + 7), u32::from_le_bytes(*b"rent") as i32)?;
    a.jne(miss)
}

/// `out` = the first entry of the request table set for `key` (a header map or frame
/// address; allocator-aligned, so a multiplicative hash spreads them). The one definition
/// the ops and the guard share. Clobbers `scratch`.
pub(super) fn request_set(
    a: &mut CodeAssembler,
    ring: &RingAddrs,
    out: AsmRegister64,
    scratch: AsmRegister64,
    key: AsmRegister64,
) -> Result<(), IcedError> {
    let sets = ctx::REQUESTS / ctx::WAYS;
    a.mov(out, 0x9e37_79b9_7f4a_7c15u64)?;
    a.imul_2(out, key)?;
    a.shr(out, 64 - sets.trailing_zeros())?;
    a.shl(out, (ctx::ENTRY * ctx::WAYS).trailing_zeros())?;
    a.mov(scratch, ring.base + ring.layout.ctx_offset() as u64 + (ctx::GOROUTINES * ctx::ENTRY) as u64)?;
    a.add(out, scratch)
}

/// Jumps to `skip` unless the guard holds. Reads only: R12 and R13 are its scratch.
pub(super) fn emit_guard(a: &mut CodeAssembler, ring: &RingAddrs, g: &Guard, skip: CodeLabel) -> Result<(), IcedError> {
    const REGS: [AsmRegister64; 9] = [rax, rbx, rcx, rdi, rsi, r8, r9, r10, r11];
    match g {
        Guard::FirstByte { ptr, len, min_len, first } => {
            let mut pass = a.create_label();
            let (p, n) = (REGS[*ptr as usize], REGS[*len as usize]);
            a.cmp(n, i32::from((*min_len).max(1)))?;
            a.jl(skip)?;
            a.test(p, p)?;
            a.je(skip)?;
            a.movzx(r13d, byte_ptr(p))?;
            a.or(r13d, 0x20)?;
            for b in first {
                a.cmp(r13d, i32::from(*b))?;
                a.je(pass)?;
            }
            a.jmp(skip)?;
            a.set_label(&mut pass)?;
        }
        Guard::InRequests { key } => {
            let mut pass = a.create_label();
            let k = REGS[*key as usize];
            a.test(k, k)?;
            a.je(skip)?;
            request_set(a, ring, r13, r12, k)?;
            for way in 0..ctx::WAYS {
                a.cmp(qword_ptr(r13 + (way * ctx::ENTRY + ctx::KEY) as i32), k)?;
                a.je(pass)?;
            }
            a.jmp(skip)?;
            a.set_label(&mut pass)?;
        }
        Guard::Zero { reg } => {
            let r = REGS[*reg as usize];
            a.test(r, r)?;
            a.jne(skip)?;
        }
        Guard::Tagged { .. } | Guard::Own => {
            let mut pass = a.create_label();
            let sets = ctx::GOROUTINES / ctx::WAYS;
            let goid = qword_ptr(r14 + ring.goid_offset as i32);
            a.mov(r13, goid)?;
            a.and(r13d, (sets - 1) as u32)?;
            a.shl(r13, (ctx::ENTRY * ctx::WAYS).trailing_zeros())?;
            a.mov(r12, ring.base + ring.layout.ctx_offset() as u64)?;
            a.add(r12, r13)?;
            a.mov(r13, goid)?;
            if let Guard::Tagged { bit } = g {
                a.bts(r13, *bit)?;
            }
            for way in 0..ctx::WAYS {
                a.cmp(qword_ptr(r12 + (way * ctx::ENTRY + ctx::KEY) as i32), r13)?;
                a.je(pass)?;
            }
            a.jmp(skip)?;
            a.set_label(&mut pass)?;
        }
    }
    Ok(())
}
