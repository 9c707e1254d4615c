//! The application's own OpenTelemetry spans (go.opentelemetry.io/auto/sdk): the global
//! tracer is told an auto-instrumentation is there, and each span the Auto SDK starts
//! gets its ids from the goroutine's context here, in the target, before the application
//! builds it, so that it joins the trace it runs in and the calls under it join it.
//! docs/otel-sdk.md has the argument for what is written into Go memory.

use super::*;

/// `go.opentelemetry.io/otel/trace.SpanContext`: trace id, span id, flags (unchanged
/// since otel v1.0).
const SC_TRACE: i32 = 0;
const SC_SPAN: i32 = 16;
const SC_FLAGS: i32 = 24;

impl Ops<'_> {
    /// See [`Op::AutoEnable`]. Both stores happen only when they change something: the
    /// flag's line is the application's, the header's is every thread's.
    pub(super) fn auto_enable(&self, a: &mut CodeAssembler, flag: u8, done: CodeLabel) -> Result<(), IcedError> {
        let mut noted = a.create_label();
        a.mov(rsi, self.reg(flag))?;
        a.test(rsi, rsi)?;
        a.je(done)?;
        a.cmp(byte_ptr(rsi), 1)?;
        a.je(noted)?;
        a.mov(byte_ptr(rsi), 1)?;
        a.set_label(&mut noted)?;
        a.mov(rax, self.ring.base + header::AUTO_FLAG as u64)?;
        a.cmp(qword_ptr(rax), rsi)?;
        a.je(done)?;
        a.mov(qword_ptr(rax), rsi)
    }

    /// See [`Op::AutoStart`]; `regs` are the span, psc, sampled and sc registers.
    pub(super) fn auto_start(
        &self,
        a: &mut CodeAssembler,
        [span, psc, sampled, sc]: [u8; 4],
        dest: u16,
        done: CodeLabel,
    ) -> Result<(), IcedError> {
        let (mut no_sc, mut no_parent, mut kept, mut none, mut saved) =
            (a.create_label(), a.create_label(), a.create_label(), a.create_label(), a.create_label());
        self.begin_span(a, dest, CtxState::Active, ParentKind::Local)?;
        // The span's context.
        a.mov(rdi, self.reg(sc))?;
        a.test(rdi, rdi)?;
        a.je(no_sc)?;
        self.span_context(a, span_ids::SPAN, dest)?;
        a.set_label(&mut no_sc)?;
        // Its parent's, when it has one.
        a.cmp(self.data(dest, span_ids::PARENT_KIND), ParentKind::None as i32)?;
        a.je(no_parent)?;
        a.mov(rdi, self.reg(psc))?;
        a.test(rdi, rdi)?;
        a.je(no_parent)?;
        self.span_context(a, span_ids::PARENT, dest)?;
        a.set_label(&mut no_parent)?;
        // Not sampled: the SDK then builds nothing and never reports the span's end.
        a.movzx(eax, byte_ptr(r12 + self.dest(dest, span_ids::FLAGS + 1)))?;
        a.and(eax, 1)?;
        a.jne(kept)?;
        a.mov(rdi, self.reg(sampled))?;
        a.test(rdi, rdi)?;
        a.je(kept)?;
        a.mov(byte_ptr(rdi), 0)?;
        a.set_label(&mut kept)?;
        // The goroutine's context from before waits under the span's address.
        a.mov(r11, self.reg(span))?;
        a.test(r11, r11)?;
        a.je(done)?;
        self.place(a, Table::Requests, None)?;
        a.mov(rbx, rdi)?;
        self.goid(a)?;
        self.find(a, Table::Goroutines, none, Some(CtxState::Active))?;
        self.copy(a, (rdi, 8), (rbx, 8), ctx::ENTRY - 8)?;
        a.jmp(saved)?;
        a.set_label(&mut none)?;
        a.mov(qword_ptr(rbx + ctx::STATE as i32), 0)?;
        a.set_label(&mut saved)?;
        self.copy(a, (r12, self.dest(dest, span_ids::SPAN)), (rbx, ctx::AUTO_SPAN as i32), 16)?;
        a.mov(r11, self.reg(span))?;
        a.mov(qword_ptr(rbx + ctx::KEY as i32), r11)?;
        // The span is the goroutine's context now.
        self.goid(a)?;
        self.place(a, Table::Goroutines, None)?;
        self.publish(a, dest)?;
        a.mov(qword_ptr(rdi + ctx::MARK as i32), 0)
    }

    /// Writes a `trace.SpanContext` at RDI: the trace id at `dest`, the span id at
    /// `dest + id` (hex in the record, bytes in Go), the sampled flag.
    fn span_context(&self, a: &mut CodeAssembler, id: usize, dest: u16) -> Result<(), IcedError> {
        for (from, to) in [(span_ids::TRACE, SC_TRACE), (span_ids::TRACE + 16, SC_TRACE + 8), (id, SC_SPAN)] {
            self.trace_low(a, (r12, self.dest(dest, from)))?;
            // The first digits are the first byte.
            a.bswap(rcx)?;
            a.mov(qword_ptr(rdi + to), rcx)?;
        }
        a.movzx(eax, byte_ptr(r12 + self.dest(dest, span_ids::FLAGS + 1)))?;
        a.and(eax, 1)?;
        a.mov(byte_ptr(rdi + SC_FLAGS), al)
    }

    /// See [`Op::AutoEnd`].
    pub(super) fn auto_end(&self, a: &mut CodeAssembler, span: u8, done: CodeLabel) -> Result<(), IcedError> {
        let (mut forget, mut release) = (a.create_label(), a.create_label());
        a.mov(r11, self.reg(span))?;
        a.test(r11, r11)?;
        a.je(done)?;
        self.find(a, Table::Requests, done, None)?;
        a.mov(rbx, rdi)?;
        self.goid(a)?;
        self.find(a, Table::Goroutines, release, None)?;
        // Only while the goroutine is still in this span (it may end on another one).
        for k in [0, 8] {
            a.mov(rax, qword_ptr(rdi + ctx::SPAN as i32 + k))?;
            a.cmp(rax, qword_ptr(rbx + ctx::AUTO_SPAN as i32 + k))?;
            a.jne(release)?;
        }
        a.cmp(qword_ptr(rbx + ctx::STATE as i32), CtxState::Active as i32)?;
        a.jne(forget)?;
        self.copy(a, (rbx, 8), (rdi, 8), ctx::ENTRY - 8)?;
        a.jmp(release)?;
        a.set_label(&mut forget)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
        a.set_label(&mut release)?;
        a.mov(qword_ptr(rbx + ctx::KEY as i32), 0)
    }
}
