//! The HTTP/2 half of the trace-context operations: appending the goroutine's outgoing
//! `traceparent` to a request's header block, in the framer's buffer or after the frame
//! in its writer's (docs/grpc.md has the safety argument).

use super::*;

/// A header block's frame may reach 9 + 16384 bytes (the smallest maximum frame size a
/// peer may set); a tracestate copy may write up to 8 bytes past its field,
/// inside the buffer's capacity.
const FRAME_ROOM: u64 = 9 + 16384 + 8;

/// Where [`Op::InjectH2After`] keeps two registers in its record while the tracestate is
/// copied (after the flag, the span id and the tracestate word).
pub(in crate::codegen) const SCRATCH: usize = 32;

impl Ops<'_> {
    /// See [`Op::InjectH2`]. The frame is the buffer's first `len` bytes: a 9-byte header
    /// (length, type, flags, stream) and the payload. Only a HEADERS or CONTINUATION frame
    /// with END_HEADERS (the end of the block) and without padding gets the field, and
    /// only when the payload stays within 16384 bytes, the smallest maximum frame size a
    /// peer may set; the bytes go to `buf[len:len+69]`, inside the capacity, and `len`
    /// grows by 69. The outgoing span is used once, written, deferred or not.
    pub(super) fn inject_h2(
        &self,
        a: &mut CodeAssembler,
        framer: u8,
        wbuf_off: i32,
        after: Option<AfterWrite>,
        dest: u16,
        done: CodeLabel,
    ) -> Result<(), IcedError> {
        let field = ctx::H2_FIELD as i32;
        let (mut used, mut full) = (a.create_label(), a.create_label());
        a.mov(self.data(dest, 0), 0)?;
        a.mov(self.data(dest, 24), 0)?;
        self.tagged_goid(a, ctx::OUT_TAG_BIT)?;
        self.find(a, Table::Goroutines, done, Some(CtxState::Active))?;
        a.mov(rsi, self.reg(framer))?;
        a.test(rsi, rsi)?;
        a.je(done)?;
        a.mov(rcx, qword_ptr(rsi + wbuf_off + 8))?;
        a.mov(r8, qword_ptr(rsi + wbuf_off))?;
        self.end_of_block(a, done, used)?;
        a.lea(rax, qword_ptr(rcx + field))?;
        a.cmp(rax, 9 + 16384)?;
        a.ja(used)?;
        if after.is_some() {
            // Both fields, or both wait for the writer's larger buffer.
            self.tracestate_need(a)?;
            a.lea(r9, qword_ptr(rax + rbx))?;
            a.cmp(r9, qword_ptr(rsi + wbuf_off + 16))?;
        } else {
            a.cmp(rax, qword_ptr(rsi + wbuf_off + 16))?;
        }
        a.ja(full)?;
        a.add(r8, rcx)?;
        self.write_field(a)?;
        // The tracestate field after it, within the capacity and the frame size.
        a.lea(r10, qword_ptr(r8 + field))?;
        a.mov(r11, qword_ptr(rsi + wbuf_off + 16))?;
        a.mov(r9, FRAME_ROOM)?;
        a.cmp(r11, r9)?;
        a.cmova(r11, r9)?;
        a.sub(r11, rax)?;
        self.tracestate_out(a, Form::Field, self.dest(dest, 24))?;
        a.add(rax, rbx)?;
        a.mov(qword_ptr(rsi + wbuf_off + 8), rax)?;
        a.mov(self.data(dest, 0), 1)?;
        self.copy(a, (rdi, ctx::SPAN as i32), (r12, self.dest(dest, 8)), 16)?;
        a.jmp(used)?;
        a.set_label(&mut full)?;
        a.mov(self.data(dest, 0), 2)?;
        if let Some(w) = after {
            // The writer must be the one whose buffer the return probe will look at.
            a.mov(rax, qword_ptr(rsi + w.w_off))?;
            a.mov(r9, w.itab)?;
            a.cmp(rax, r9)?;
            a.jne(used)?;
            // The span moves to the deferred entry, whose state word holds the framer.
            a.mov(r10, rsi)?;
            a.mov(rsi, rdi)?;
            self.tagged_goid(a, ctx::AFTER_TAG_BIT)?;
            self.place(a, Table::Goroutines, Some(rsi))?;
            self.copy(a, (rsi, 0), (rdi, 0), ctx::ENTRY)?;
            a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
            a.mov(qword_ptr(rdi + ctx::STATE as i32), r10)?;
            a.mov(rdi, rsi)?;
            a.mov(self.data(dest, 0), 3)?;
        }
        a.set_label(&mut used)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
        a.jmp(done)
    }

    /// With R8 = a frame's bytes and RCX = its length: jumps to `not_frame` unless it is at
    /// least a header long and is a HEADERS or CONTINUATION frame with END_HEADERS, and to
    /// `refuse` when it is padded. Clobbers EAX.
    pub(super) fn end_of_block(
        &self,
        a: &mut CodeAssembler,
        not_frame: CodeLabel,
        refuse: CodeLabel,
    ) -> Result<(), IcedError> {
        const HEADERS: i32 = 1;
        const CONTINUATION: i32 = 9;
        const END_HEADERS: i32 = 4;
        const PADDED: i32 = 8;
        let mut block = a.create_label();
        a.cmp(rcx, 9)?;
        a.jb(not_frame)?;
        a.test(r8, r8)?;
        a.je(not_frame)?;
        a.movzx(eax, byte_ptr(r8 + 3))?;
        a.cmp(eax, HEADERS)?;
        a.je(block)?;
        a.cmp(eax, CONTINUATION)?;
        a.jne(not_frame)?;
        a.set_label(&mut block)?;
        a.movzx(eax, byte_ptr(r8 + 4))?;
        a.test(eax, END_HEADERS)?;
        a.je(not_frame)?;
        a.test(eax, PADDED)?;
        a.jne(refuse)
    }

    /// Writes the 69-byte field at R8 from the entry at RDI: 0x00 (literal, not indexed,
    /// new name), 11, "traceparent", 55, `00-<trace>-<span>-<flags>`. Clobbers R9.
    pub(super) fn write_field(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.mov(word_ptr(r8), u32::from(u16::from_le_bytes([0x00, 11])))?;
        a.mov(r9, u64::from_le_bytes(*b"tracepar"))?;
        a.mov(qword_ptr(r8 + 2), r9)?;
        a.mov(dword_ptr(r8 + 9), u32::from_le_bytes(*b"rent"))?;
        a.mov(byte_ptr(r8 + 13), 55u32)?;
        a.mov(word_ptr(r8 + 14), u32::from(u16::from_le_bytes(*b"00")))?;
        a.mov(byte_ptr(r8 + 16), u32::from(b'-'))?;
        self.copy(a, (rdi, ctx::TRACE as i32), (r8, 17), 32)?;
        a.mov(byte_ptr(r8 + 49), u32::from(b'-'))?;
        self.copy(a, (rdi, ctx::SPAN as i32), (r8, 50), 16)?;
        a.mov(byte_ptr(r8 + 66), u32::from(b'-'))?;
        self.write_flags(a, 67)
    }

    /// See [`Op::InjectH2After`]. The frame buffer still holds the frame (`len` bytes,
    /// length field filled in); it is in the writer's buffer exactly when the writer's
    /// last `len` bytes are these (a flush would have emptied it, or left only a tail).
    pub(super) fn inject_h2_after(
        &self,
        a: &mut CodeAssembler,
        wbuf_off: i32,
        w: &AfterWrite,
        dest: u16,
        done: CodeLabel,
    ) -> Result<(), IcedError> {
        let field = ctx::H2_FIELD as i32;
        let mut used = a.create_label();
        let mut same = a.create_label();
        a.mov(self.data(dest, 0), 0)?;
        a.mov(self.data(dest, 24), 0)?;
        self.tagged_goid(a, ctx::AFTER_TAG_BIT)?;
        self.find(a, Table::Goroutines, done, None)?;
        a.mov(self.data(dest, 0), 2)?;
        // RSI = the framer, R10 = its writer (the itab was checked at entry).
        a.mov(rsi, qword_ptr(rdi + ctx::STATE as i32))?;
        a.test(rsi, rsi)?;
        a.je(used)?;
        a.mov(r10, qword_ptr(rsi + w.w_off + 8))?;
        a.test(r10, r10)?;
        a.je(used)?;
        a.mov(rcx, qword_ptr(rsi + wbuf_off + 8))?;
        a.mov(r8, qword_ptr(rsi + wbuf_off))?;
        self.end_of_block(a, used, used)?;
        // The payload with the field must fit the smallest maximum frame size.
        a.lea(rax, qword_ptr(rcx + field))?;
        a.cmp(rax, 9 + 16384)?;
        a.ja(used)?;
        // RAX = the fill index; R13 = the buffer's slice header.
        a.mov(rax, qword_ptr(r10 + w.fill_off))?;
        if w.buf_indirect {
            a.mov(r13, qword_ptr(r10 + w.buf_off))?;
            a.test(r13, r13)?;
            a.je(used)?;
        } else {
            a.lea(r13, qword_ptr(r10 + w.buf_off))?;
        }
        // The frame must end at the fill index and the field fit after it.
        a.cmp(rax, rcx)?;
        a.jb(used)?;
        a.lea(r9, qword_ptr(rax + field))?;
        a.cmp(r9, qword_ptr(r13 + 8))?;
        a.ja(used)?;
        // RSI = where the frame starts in the writer's buffer; compare its header.
        a.mov(rsi, qword_ptr(r13))?;
        a.test(rsi, rsi)?;
        a.je(used)?;
        a.add(rsi, rax)?;
        a.sub(rsi, rcx)?;
        a.mov(r9, qword_ptr(r8))?;
        a.cmp(r9, qword_ptr(rsi))?;
        a.jne(used)?;
        a.movzx(r9d, byte_ptr(r8 + 8))?;
        a.movzx(r11d, byte_ptr(rsi + 8))?;
        a.cmp(r9d, r11d)?;
        a.je(same)?;
        a.jmp(used)?;
        a.set_label(&mut same)?;
        // The field after the frame, then the tracestate field where both the buffer and
        // the frame size have room (the writer and the frame's length wait in the record
        // while R10 and RCX serve the copy).
        a.mov(r8, qword_ptr(r13))?;
        a.add(r8, rax)?;
        self.write_field(a)?;
        a.mov(self.data(dest, SCRATCH), r10)?;
        a.mov(self.data(dest, SCRATCH + 8), rcx)?;
        a.mov(r9, qword_ptr(r13 + 8))?;
        a.sub(r9, rax)?;
        a.sub(r9, field)?;
        a.mov(r11, FRAME_ROOM - field as u64)?;
        a.sub(r11, rcx)?;
        a.cmp(r11, r9)?;
        a.cmova(r11, r9)?;
        a.lea(r10, qword_ptr(r8 + field))?;
        self.tracestate_out(a, Form::Field, self.dest(dest, 24))?;
        a.mov(r10, self.data(dest, SCRATCH))?;
        a.mov(rcx, self.data(dest, SCRATCH + 8))?;
        // The new payload length, big-endian, in the frame's first three bytes.
        a.lea(r9, qword_ptr(rcx + rbx + field - 9))?;
        a.mov(byte_ptr(rsi + 2), r9b)?;
        a.shr(r9d, 8)?;
        a.mov(byte_ptr(rsi + 1), r9b)?;
        a.shr(r9d, 8)?;
        a.mov(byte_ptr(rsi), r9b)?;
        // The fill index past both.
        a.lea(rax, qword_ptr(rax + rbx + field))?;
        a.mov(qword_ptr(r10 + w.fill_off), rax)?;
        a.mov(self.data(dest, 0), 1)?;
        self.copy(a, (rdi, ctx::SPAN as i32), (r12, self.dest(dest, 8)), 16)?;
        a.set_label(&mut used)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
        a.jmp(done)
    }
}
