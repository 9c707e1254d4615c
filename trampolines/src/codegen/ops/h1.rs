//! The HTTP/1 half of trace context out: a `traceparent` line (and the trace's
//! `tracestate`) written into the connection's `bufio.Writer` before net/http writes the
//! request's own header lines, and taken back out when those lines turn out to carry the
//! application's own `traceparent` (docs/http.md has the safety argument).

use super::tracestate::Form;
use super::*;

impl Ops<'_> {
    /// See [`Op::InjectTraceparent`]; `regs` are the map, itab and data registers. When
    /// the line went in, the goroutine keeps (under [`ctx::LINE_TAG_BIT`]) the writer, where
    /// the lines start and their length, for [`Op::UndoOwnTraceparent`] at the return.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn inject_line(
        &self,
        a: &mut CodeAssembler,
        [map, itab, data]: [u8; 3],
        write_fn: u64,
        buf_off: i32,
        n_off: i32,
        dest: u16,
        done: CodeLabel,
    ) -> Result<(), IcedError> {
        a.mov(self.data(dest, 0), 0)?;
        a.mov(self.data(dest, 24), 0)?;
        a.mov(r11, self.reg(map))?;
        a.test(r11, r11)?;
        a.je(done)?;
        self.find(a, Table::Requests, done, Some(CtxState::Active))?;
        // The writer must be a *bufio.Writer: its itab's first method (io.Writer's
        // Write) is bufio.(*Writer).Write.
        a.mov(rsi, self.reg(itab))?;
        a.test(rsi, rsi)?;
        a.je(done)?;
        a.mov(rsi, qword_ptr(rsi + ITAB_FUN0))?;
        a.mov(r8, write_fn)?;
        a.cmp(rsi, r8)?;
        a.jne(done)?;
        a.mov(rsi, self.reg(data))?;
        a.test(rsi, rsi)?;
        a.je(done)?;
        // Room for the whole line in buf[n:len(buf)], or nothing is written.
        a.mov(rcx, qword_ptr(rsi + n_off))?;
        a.test(rcx, rcx)?;
        a.js(done)?;
        a.lea(rax, qword_ptr(rcx + W3C_LINE as i32))?;
        a.cmp(rax, qword_ptr(rsi + buf_off + 8))?;
        a.ja(done)?;
        a.mov(r8, qword_ptr(rsi + buf_off))?;
        a.test(r8, r8)?;
        a.je(done)?;
        a.add(r8, rcx)?;
        a.mov(r9, u64::from_le_bytes(*b"tracepar"))?;
        a.mov(qword_ptr(r8), r9)?;
        a.mov(r9, u64::from_le_bytes(*b"ent: 00-"))?;
        a.mov(qword_ptr(r8 + 8), r9)?;
        self.copy(a, (rdi, ctx::TRACE as i32), (r8, 16), 32)?;
        a.mov(byte_ptr(r8 + 48), u32::from(b'-'))?;
        self.copy(a, (rdi, ctx::SPAN as i32), (r8, 49), 16)?;
        a.mov(byte_ptr(r8 + 65), u32::from(b'-'))?;
        self.write_flags(a, 66)?;
        a.mov(word_ptr(r8 + 68), u32::from(u16::from_le_bytes(*b"\r\n")))?;
        // Then the trace's tracestate line, where the buffer has room for it.
        a.lea(r10, qword_ptr(r8 + W3C_LINE as i32))?;
        a.mov(r11, qword_ptr(rsi + buf_off + 8))?;
        a.sub(r11, rax)?;
        self.tracestate_out(a, Form::Line, self.dest(dest, 24))?;
        a.add(rax, rbx)?;
        a.mov(qword_ptr(rsi + n_off), rax)?;
        // One request, one line: a later request with the same map gets its own.
        a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
        a.mov(self.data(dest, 0), 1)?;
        self.copy(a, (rdi, ctx::SPAN as i32), (r12, self.dest(dest, 8)), 16)?;
        // For the return: the writer, where the lines start, their length.
        a.lea(r9, qword_ptr(rbx + W3C_LINE as i32))?;
        a.mov(r10, rax)?;
        self.tagged_goid(a, ctx::LINE_TAG_BIT)?;
        self.place(a, Table::Goroutines, None)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
        a.mov(qword_ptr(rdi + ctx::STATE as i32), rsi)?;
        a.sub(r10, r9)?;
        a.mov(qword_ptr(rdi + ctx::TRACE as i32), r10)?;
        a.mov(qword_ptr(rdi + ctx::TRACE as i32 + 8), r9)
    }

    /// See [`Op::UndoOwnTraceparent`]. The lines are still where they were written when
    /// the writer's fill index is at least past them and they begin `traceparent: 00-`
    /// (a flush would have moved the index back); the application's own is a later line
    /// whose name is `traceparent` in any case. Taking ours out moves the bytes after them
    /// down over them (`rep movsb` forward: the destination is below the source) and the
    /// fill index back by their length. `dest` gets 1 and the length when it did, 2 when
    /// the buffer was flushed (nothing can be taken back), else 0.
    pub(super) fn undo_own_line(
        &self,
        a: &mut CodeAssembler,
        buf_off: i32,
        n_off: i32,
        dest: u16,
        done: CodeLabel,
    ) -> Result<(), IcedError> {
        let (mut scan, mut next, mut own, mut gone) =
            (a.create_label(), a.create_label(), a.create_label(), a.create_label());
        a.mov(self.data(dest, 0), 0)?;
        self.tagged_goid(a, ctx::LINE_TAG_BIT)?;
        self.find(a, Table::Goroutines, done, None)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
        // RBX = the writer, R10 = where our lines start, R11 = their length, RCX = the
        // fill index, R8 = the buffer.
        a.mov(rbx, qword_ptr(rdi + ctx::STATE as i32))?;
        a.test(rbx, rbx)?;
        a.je(done)?;
        a.mov(r10, qword_ptr(rdi + ctx::TRACE as i32))?;
        a.mov(r11, qword_ptr(rdi + ctx::TRACE as i32 + 8))?;
        a.mov(rcx, qword_ptr(rbx + n_off))?;
        a.mov(r8, qword_ptr(rbx + buf_off))?;
        a.test(r8, r8)?;
        a.je(done)?;
        a.cmp(rcx, qword_ptr(rbx + buf_off + 8))?;
        a.ja(gone)?;
        a.lea(rax, qword_ptr(r10 + r11))?;
        a.cmp(rcx, rax)?;
        a.jb(gone)?;
        a.mov(rax, u64::from_le_bytes(*b"tracepar"))?;
        a.cmp(qword_ptr(r8 + r10), rax)?;
        a.jne(gone)?;
        a.mov(rax, u64::from_le_bytes(*b"ent: 00-"))?;
        a.cmp(qword_ptr(r8 + r10 + 8), rax)?;
        a.jne(gone)?;
        // R9 = each '\n' from the one ending our lines; a name needs 12 bytes after it.
        a.lea(r9, qword_ptr(r10 + r11 - 1))?;
        a.mov(r13, u64::from_le_bytes(*b"tracepar"))?;
        a.set_label(&mut scan)?;
        a.lea(rax, qword_ptr(r9 + 13))?;
        a.cmp(rax, rcx)?;
        a.ja(done)?;
        a.cmp(byte_ptr(r8 + r9), i32::from(b'\n'))?;
        a.jne(next)?;
        a.mov(rax, qword_ptr(r8 + r9 + 1))?;
        a.mov(rsi, 0x2020_2020_2020_2020u64)?;
        a.or(rax, rsi)?;
        a.cmp(rax, r13)?;
        a.jne(next)?;
        a.mov(eax, dword_ptr(r8 + r9 + 8))?;
        a.or(eax, 0x2020_2020)?;
        a.cmp(eax, u32::from_le_bytes(*b"rent") as i32)?;
        a.jne(next)?;
        a.cmp(byte_ptr(r8 + r9 + 12), i32::from(b':'))?;
        a.je(own)?;
        a.set_label(&mut next)?;
        a.inc(r9)?;
        a.jmp(scan)?;
        a.set_label(&mut own)?;
        a.mov(self.data(dest, 8), r11)?;
        // buf[start+len:n] moves to buf[start:], n -= len.
        a.lea(rdi, qword_ptr(r8 + r10))?;
        a.lea(rsi, qword_ptr(rdi + r11))?;
        a.sub(rcx, r10)?;
        a.sub(rcx, r11)?;
        a.rep().movsb()?;
        a.sub(rdi, r8)?;
        a.mov(qword_ptr(rbx + n_off), rdi)?;
        a.mov(self.data(dest, 0), 1)?;
        a.jmp(done)?;
        a.set_label(&mut gone)?;
        a.mov(self.data(dest, 0), 2)
    }
}
