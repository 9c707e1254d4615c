//! Kafka (segmentio/kafka-go) trace context: a `traceparent` header on the messages a
//! `WriteMessages` call writes, and a message's processing context on the goroutine that
//! fetched it (docs/kafka.md has the safety argument).

use ring_abi::arena;

use super::*;

impl Ops<'_> {
    fn arena(&self) -> u64 {
        self.ring.base + self.ring.layout.arena_offset() as u64
    }

    /// See [`Op::KafkaSlot`].
    pub(super) fn kafka_slot(&self, a: &mut CodeAssembler, dest: u16) -> Result<(), IcedError> {
        if !self.ring.layout.arena {
            return Ok(());
        }
        a.mov(r8, self.arena())?;
        a.mov(eax, 1)?;
        a.lock().xadd(qword_ptr(r8 + arena::NEXT as i32), rax)?;
        a.and(eax, (arena::SLOTS - 1) as u32)?;
        a.shl(rax, arena::SLOT.trailing_zeros())?;
        a.lea(rsi, qword_ptr(r8 + rax + arena::FIRST as i32))?;
        // `00-<trace>-<span>-<flags>`, from the ids the span's op wrote at `dest`.
        let v = arena::VALUE as i32;
        a.mov(word_ptr(rsi + v), i32::from(u16::from_le_bytes(*b"00")))?;
        for at in [2, 35, 52] {
            a.mov(byte_ptr(rsi + v + at), i32::from(b'-'))?;
        }
        self.copy(a, (r12, self.dest(dest, span_ids::TRACE)), (rsi, v + 3), 32)?;
        self.copy(a, (r12, self.dest(dest, span_ids::SPAN)), (rsi, v + 36), 16)?;
        a.movzx(r9d, word_ptr(r12 + self.dest(dest, span_ids::FLAGS)))?;
        a.mov(word_ptr(rsi + v + 53), r9w)?;
        // The goroutine's `add`s find the slot under its tagged key.
        self.tagged_goid(a, ctx::KAFKA_TAG_BIT)?;
        self.place(a, Table::Goroutines, None)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
        a.mov(qword_ptr(rdi + ctx::STATE as i32), rsi)
    }

    /// See [`Op::KafkaHeader`].
    pub(super) fn kafka_header(
        &self,
        a: &mut CodeAssembler,
        headers: i32,
        dest: u16,
        done: CodeLabel,
    ) -> Result<(), IcedError> {
        let mut full = a.create_label();
        a.mov(self.data(dest, 0), 0)?;
        self.tagged_goid(a, ctx::KAFKA_TAG_BIT)?;
        self.find(a, Table::Goroutines, done, None)?;
        a.mov(rsi, qword_ptr(rdi + ctx::STATE as i32))?;
        // Only a message without a header array of its own: spare capacity may be another
        // slice's elements, and a copy of the application's headers in memory Go's
        // collector does not scan would let it free their bytes while the batch holds them.
        a.cmp(qword_ptr(rsp + headers + 16), 0)?;
        a.jne(full)?;
        a.lea(rax, qword_ptr(rsi + arena::HEADER as i32))?;
        a.mov(qword_ptr(rsp + headers), rax)?;
        a.mov(qword_ptr(rsp + headers + 8), 1)?;
        a.mov(qword_ptr(rsp + headers + 16), 1)?;
        a.mov(self.data(dest, 0), 1)?;
        a.jmp(done)?;
        a.set_label(&mut full)?;
        a.mov(self.data(dest, 0), 2)
    }

    /// RAX = the goroutine's key XOR the consumer mark, for R11 = the goid.
    fn consumer_mark(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.mov(rax, ctx::CONSUMER_MARK)?;
        a.xor(rax, r11)
    }

    /// See [`Op::ConsumeBegin`].
    pub(super) fn consume_begin(
        &self,
        a: &mut CodeAssembler,
        headers: i32,
        dest: u16,
        done: CodeLabel,
    ) -> Result<(), IcedError> {
        let (mut fresh, mut scan, mut begin) = (a.create_label(), a.create_label(), a.create_label());
        // Inside a span the goroutine serves: the processing is its child, and the
        // goroutine's context stays the span's.
        self.goid(a)?;
        self.find(a, Table::Goroutines, fresh, None)?;
        self.consumer_mark(a)?;
        a.cmp(qword_ptr(rdi + ctx::MARK as i32), rax)?;
        a.je(fresh)?;
        a.cmp(qword_ptr(rdi + ctx::STATE as i32), CtxState::Active as i32)?;
        a.jne(fresh)?;
        self.begin_span(a, dest, CtxState::Active, ParentKind::Local)?;
        a.jmp(done)?;
        // Else a context of its own, continuing the message's `traceparent`; a pending
        // context left over from anything else is not the message's.
        a.set_label(&mut fresh)?;
        self.goid(a)?;
        self.find(a, Table::Goroutines, scan, Some(CtxState::Pending))?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
        a.set_label(&mut scan)?;
        let (mut each, mut next) = (a.create_label(), a.create_label());
        a.mov(rbx, qword_ptr(rsp + headers))?;
        a.mov(r10, qword_ptr(rsp + headers + 8))?;
        a.test(rbx, rbx)?;
        a.je(begin)?;
        a.test(r10, r10)?;
        a.jle(begin)?;
        // At most 16 headers are looked at (kafka.Header is a string and a byte slice).
        a.cmp(r10, 16)?;
        a.jbe(each)?;
        a.mov(r10d, 16)?;
        a.set_label(&mut each)?;
        is_traceparent(a, qword_ptr(rbx), qword_ptr(rbx + 8), next)?;
        a.mov(rax, qword_ptr(rbx + 16))?;
        a.mov(rcx, qword_ptr(rbx + 24))?;
        self.stash_value(a, begin)?;
        a.jmp(begin)?;
        a.set_label(&mut next)?;
        a.add(rbx, arena::HEADER_LEN as i32)?;
        a.dec(r10)?;
        a.jne(each)?;
        a.set_label(&mut begin)?;
        self.begin_span(a, dest, CtxState::Pending, ParentKind::Remote)?;
        self.goid(a)?;
        self.place(a, Table::Goroutines, None)?;
        self.publish(a, dest)?;
        self.consumer_mark(a)?;
        a.mov(qword_ptr(rdi + ctx::MARK as i32), rax)
    }

    /// See [`Op::ConsumeEnd`].
    pub(super) fn consume_end(&self, a: &mut CodeAssembler, done: CodeLabel) -> Result<(), IcedError> {
        self.goid(a)?;
        self.find(a, Table::Goroutines, done, None)?;
        self.consumer_mark(a)?;
        a.cmp(qword_ptr(rdi + ctx::MARK as i32), rax)?;
        a.jne(done)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
        a.mov(qword_ptr(rdi + ctx::MARK as i32), 0)
    }
}
