//! Executes generated trampolines in this process, around a Go-shaped function built for
//! the test: every register except R12, R13 and the flags must come back unchanged, and
//! the ring must hold exactly the expected records.

use iced_x86::code_asm::*;
use ring_abi::{Kind, Layout, header, ring as sub, slot};
use trampolines::codegen::ByteCopy;
use trampolines::codegen::{RingSelect, entry_trampoline, return_trampoline};
use trampolines::site::{entry_patch, return_patches};
use trampolines::{CapturePlan, Function, Redirect, RingAddrs};

const GOID_OFF: u32 = 152;

thread_local! {
    /// The lossless wait the next rig on this thread is built with (0: none).
    static WAIT_SPINS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    static SAMPLING: std::cell::Cell<trampolines::codegen::Sampling> = std::cell::Cell::new(Default::default());
    /// The site id of the next rig's return trampolines (stats pair them with the entry's).
    static RETURN_SITE: std::cell::Cell<u32> = const { std::cell::Cell::new(8) };
}

struct Mem {
    ptr: *mut u8,
    len: usize,
}

impl Mem {
    fn map(len: usize, exec: bool) -> Mem {
        let prot = libc::PROT_READ | libc::PROT_WRITE | if exec { libc::PROT_EXEC } else { 0 };
        // SAFETY: anonymous private mapping, checked below.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(ptr, libc::MAP_FAILED);
        Mem { ptr: ptr.cast(), len }
    }
    /// A page-aligned executable mapping at exactly `at`.
    fn map_at(at: u64, len: usize) -> Mem {
        let prot = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        // SAFETY: a fresh anonymous mapping that replaces nothing, checked below.
        let ptr = unsafe { libc::mmap(at as *mut libc::c_void, len, prot, flags, -1, 0) };
        assert_eq!(ptr as u64, at, "mapping a page at {at:#x}");
        Mem { ptr: ptr.cast(), len }
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
    fn write(&self, at: u64, bytes: &[u8]) {
        let off = (at - self.addr()) as usize;
        assert!(off + bytes.len() <= self.len);
        // SAFETY: in bounds of our mapping.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: our mapping, len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: our mapping, len bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

// SAFETY: the mapping is plain memory; the tests share it read-only across threads
// (the trampolines write the ring with atomic instructions).
unsafe impl Sync for Mem {}
unsafe impl Send for Mem {}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Registers in and out of a call: RAX RBX RCX RDI RSI R8 R9 R10 R11 RDX R14 RBP R15, then
/// X0..X7 (low 64 bits), then the function address at index 21.
const NREGS: usize = 22;

/// Calls `regs[21]` with every listed register loaded from `regs`, and stores them back
/// after the call.
unsafe fn call_with(regs: &mut [u64; NREGS]) {
    let p = regs.as_mut_ptr();
    // SAFETY: the callee is test code that follows the Go register ABI; every register it
    // may change is declared clobbered, and rbx/rbp/r15 are saved by hand.
    unsafe {
        std::arch::asm!(
            "push rbx", "push rbp", "push r15", "push rdi",
            "mov r15, rdi",
            "movq xmm0, [r15+104]", "movq xmm1, [r15+112]", "movq xmm2, [r15+120]", "movq xmm3, [r15+128]",
            "movq xmm4, [r15+136]", "movq xmm5, [r15+144]", "movq xmm6, [r15+152]", "movq xmm7, [r15+160]",
            "mov rax, [r15]", "mov rbx, [r15+8]", "mov rcx, [r15+16]", "mov rdi, [r15+24]", "mov rsi, [r15+32]",
            "mov r8, [r15+40]", "mov r9, [r15+48]", "mov r10, [r15+56]", "mov r11, [r15+64]", "mov rdx, [r15+72]",
            "mov r14, [r15+80]", "mov rbp, [r15+88]",
            "call qword ptr [r15+168]",
            "mov [r15], rax", "mov [r15+8], rbx", "mov [r15+16], rcx", "mov [r15+24], rdi", "mov [r15+32], rsi",
            "mov [r15+40], r8", "mov [r15+48], r9", "mov [r15+56], r10", "mov [r15+64], r11", "mov [r15+72], rdx",
            "mov [r15+80], r14", "mov [r15+88], rbp", "mov [r15+96], r15",
            "movq [r15+104], xmm0", "movq [r15+112], xmm1", "movq [r15+120], xmm2", "movq [r15+128], xmm3",
            "movq [r15+136], xmm4", "movq [r15+144], xmm5", "movq [r15+152], xmm6", "movq [r15+160], xmm7",
            "pop rdi", "pop r15", "pop rbp", "pop rbx",
            in("rdi") p,
            out("rax") _, out("rcx") _, out("rsi") _, out("rdx") _, out("r8") _, out("r9") _, out("r10") _,
            out("r11") _, out("r12") _, out("r13") _, out("r14") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            out("xmm6") _, out("xmm7") _,
        );
    }
}

/// A Go-shaped function: stack check, frame, body `RAX += RBX`, epilogue, morestack block.
fn go_function(at: u64, frame: i32) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut morestack = a.create_label();
    a.cmp(rsp, qword_ptr(r14 + 16)).unwrap();
    a.jbe(morestack).unwrap();
    a.push(rbp).unwrap();
    a.mov(rbp, rsp).unwrap();
    a.sub(rsp, frame).unwrap();
    a.add(rax, rbx).unwrap();
    a.add(rsp, frame).unwrap();
    a.pop(rbp).unwrap();
    a.ret().unwrap();
    a.set_label(&mut morestack).unwrap();
    a.int3().unwrap();
    let mut code = a.assemble(at).unwrap();
    code.resize(64, 0xcc);
    code
}

struct Rig {
    _code: Mem,
    /// Pages holding the trampolines of punned jumps.
    _punned: Vec<Mem>,
    ring: Mem,
    g: Box<[u64; 64]>,
    _m: Box<[u64; 64]>,
    _p: Box<[u64; 4]>,
    layout: Layout,
    func: u64,
}

fn rig(frame: i32, capacity: u64) -> Rig {
    rig_with(capacity, |at| go_function(at, frame), true, &CapturePlan::all())
}

/// Sub-rings in the rigs: two, so records of one thread may land in either.
const RINGS: u32 = 2;

/// A straight-line leaf like `func Add(a, b int) int`: `ADDQ BX, AX; RET`, then padding.
fn leaf_function(at: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.add(rax, rbx).unwrap();
    a.ret().unwrap();
    let mut code = a.assemble(at).unwrap();
    code.resize(32, 0xcc);
    code
}

fn rig_with(capacity: u64, build: impl Fn(u64) -> Vec<u8>, stack_check: bool, plan: &CapturePlan) -> Rig {
    rig_with_plans(capacity, build, stack_check, plan, plan)
}

fn rig_with_plans(
    capacity: u64,
    build: impl Fn(u64) -> Vec<u8>,
    stack_check: bool,
    plan: &CapturePlan,
    return_plan: &CapturePlan,
) -> Rig {
    let code = Mem::map(1 << 16, true);
    let slot_size = (slot::DATA + plan.data_len().max(return_plan.data_len())).next_power_of_two().max(256);
    let layout = Layout::new(RINGS, capacity, slot_size).unwrap().with_sites(16).with_stats(2);
    let mut ring = Mem::map(layout.total_len(), false);
    // A fresh memfd is zero: only the header is written, as inject does.
    layout.initialise_zeroed(ring.bytes_mut());
    ring.bytes_mut()[header::ENABLED] = 1;
    let func = code.addr();
    let bytes = build(func);
    code.write(func, &bytes);
    let f = Function::decode(&bytes, func, None).unwrap();
    // With a stack check: every boundary after the check is resumable, as in preemptible Go
    // code. Without: a leaf the runtime never preempts (no locals pointer map).
    let unsafe_point = |pc| if !stack_check || pc < func + 6 { -2 } else { -1 };
    let entry = entry_patch(&f, unsafe_point).unwrap();
    assert_eq!(entry.stack_check, stack_check);
    assert_eq!(entry.whole_body, !stack_check && f.branch_targets.is_empty());
    let rets = if entry.whole_body { Vec::new() } else { return_patches(&f, unsafe_point).unwrap() };
    // Writers pick their sub-ring by the P their thread holds: g.m.p.id = 1.
    let addrs = RingAddrs {
        base: ring.addr(),
        layout,
        goid_offset: GOID_OFF,
        stack_hi_offset: 8,
        select: RingSelect::ByP { g_m: 48, m_p: 208, p_id: 0 },
        wait_spins: WAIT_SPINS.with(|w| w.get()),
        sampling: SAMPLING.with(|s| s.get()),
    };
    let next = std::cell::Cell::new(func + 0x1000);
    let punned = std::cell::RefCell::new(Vec::new());
    // Where the trampoline for `redirect` goes: after the last one, or for a punned jump in
    // a page of its own inside the window its pinned byte allows.
    let place = |redirect: &Redirect| match redirect.pinned_window() {
        None => next.get(),
        Some(w) => {
            let m = Mem::map_at(w.start.next_multiple_of(4096), 4096);
            let at = m.addr();
            punned.borrow_mut().push(m);
            at
        }
    };
    let install = |tramp: trampolines::Trampoline, redirect: Redirect| {
        let area = punned.borrow();
        let mem = area.iter().find(|m| m.addr() == tramp.at).unwrap_or(&code);
        mem.write(tramp.at, &tramp.code);
        if mem.addr() != tramp.at {
            next.set(next.get() + (tramp.code.len() as u64).next_multiple_of(16));
        }
        code.write(redirect.at, &redirect.jump(tramp.at).expect("the trampoline is where the jump can reach"));
    };
    let t = entry_trampoline(&entry, 7, plan, return_plan, &addrs, place(&entry.redirect)).unwrap();
    install(t, entry.redirect);
    for r in &rets {
        let t = return_trampoline(r, RETURN_SITE.with(|s| s.get()), return_plan, &addrs, place(&r.redirect)).unwrap();
        install(t, r.redirect);
    }
    let punned = punned.into_inner();
    let mut g = Box::new([0u64; 64]);
    let mut m = Box::new([0u64; 64]);
    let p = Box::new([1u64, 0, 0, 0]);
    g[2] = 0; // stackguard0: the check always passes
    g[GOID_OFF as usize / 8] = 4242;
    m[208 / 8] = p.as_ptr() as u64;
    g[48 / 8] = m.as_ptr() as u64;
    Rig { _code: code, _punned: punned, ring, g, _m: m, _p: p, layout, func }
}

fn regs_for(r: &Rig) -> [u64; NREGS] {
    let mut regs = [0u64; NREGS];
    for (i, v) in regs.iter_mut().enumerate() {
        *v = 0x1111_0000_0000_0000 | (i as u64 * 0x0101_0101);
    }
    regs[10] = r.g.as_ptr() as u64;
    regs[11] = 0x5a5a; // rbp
    regs[21] = r.func;
    regs
}

fn u64_at(m: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(m[off..off + 8].try_into().unwrap())
}

/// Sum of a per-sub-ring counter.
fn total(r: &Rig, field: usize) -> u64 {
    (0..RINGS).map(|i| u64_at(r.ring.bytes(), r.layout.ring_offset(i) + field)).sum()
}

/// Offsets of every published record, in time order.
fn published(r: &Rig) -> Vec<usize> {
    let m = r.ring.bytes();
    let mut v = Vec::new();
    for i in 0..RINGS {
        for t in 0..u64_at(m, r.layout.ring_offset(i) + sub::HEAD) {
            let s = r.layout.slot_offset(i, t);
            assert_eq!(u64_at(m, s + slot::SEQ), t + 1, "ticket {t} of ring {i} published");
            assert_eq!(u64_at(m, s + slot::TICKET), t);
            v.push(s);
        }
    }
    v.sort_by_key(|&s| u64_at(m, s + slot::TSC));
    v
}

#[test]
fn registers_preserved_and_records_exact() {
    for frame in [0x18, 0x200] {
        let r = rig(frame, 64);
        for call in 0..5u64 {
            let mut regs = regs_for(&r);
            regs[0] = call;
            let before = regs;
            // SAFETY: the rig's function follows the register ABI.
            unsafe { call_with(&mut regs) };
            assert_eq!(regs[0], call.wrapping_add(before[1]), "RAX = RAX + RBX");
            for i in 1..=11 {
                assert_eq!(regs[i], before[i], "register #{i} changed (frame {frame:#x})");
            }
            for i in 13..21 {
                assert_eq!(regs[i], before[i], "X{} changed", i - 13);
            }
        }
        let m = r.ring.bytes();
        assert_eq!(total(&r, sub::HEAD), 10, "5 entries + 5 returns");
        assert_eq!(u64_at(m, r.layout.ring_offset(1) + sub::HEAD), 10, "all in the sub-ring of P 1");
        assert_eq!(total(&r, sub::DROPPED) + total(&r, sub::CONTENDED), 0);
        let recs = published(&r);
        for (t, &s) in recs.iter().enumerate() {
            let t = t as u64;
            let kind = Kind::from_u8(m[s + slot::KIND]).unwrap();
            assert_eq!(kind, if t.is_multiple_of(2) { Kind::Entry } else { Kind::Return });
            let site = u32::from_le_bytes(m[s + slot::SITE..s + slot::SITE + 4].try_into().unwrap());
            assert_eq!(site, if kind == Kind::Entry { 7 } else { 8 });
            assert_eq!(u64_at(m, s + slot::GOID), 4242);
            let call = t / 2;
            let got_rax = u64_at(m, s + slot::INTS);
            let got_rbx = u64_at(m, s + slot::INTS + 8);
            let want_rax = if kind == Kind::Entry { call } else { call.wrapping_add(got_rbx) };
            assert_eq!(got_rax, want_rax, "captured RAX of {kind:?} {call}");
            assert_eq!(u64_at(m, s + slot::INTS + 8 * 8), regs_for(&r)[8], "R11");
            assert_eq!(u64_at(m, s + slot::FLOATS + 8 * 7), regs_for(&r)[20], "X7");
            assert_ne!(u64_at(m, s + slot::TSC), 0);
            if kind == Kind::Return {
                let entry_sp = u64_at(m, recs[t as usize - 1] + slot::SP);
                assert_eq!(u64_at(m, s + slot::SP), entry_sp, "return SP equals entry SP");
            }
        }
    }
}

#[test]
fn straight_line_leaf_records_entry_and_return() {
    let r = rig_with(16, leaf_function, false, &CapturePlan::all());
    for call in 0..3u64 {
        let mut regs = regs_for(&r);
        regs[0] = call;
        let before = regs;
        // SAFETY: as above.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[0], call.wrapping_add(before[1]));
        assert_eq!(regs[1..12], before[1..12]);
        assert_eq!(regs[13..21], before[13..21]);
    }
    let m = r.ring.bytes();
    assert_eq!(total(&r, sub::HEAD), 6);
    for (t, &s) in published(&r).iter().enumerate() {
        let t = t as u64;
        let kind = Kind::from_u8(m[s + slot::KIND]).unwrap();
        assert_eq!(kind, if t.is_multiple_of(2) { Kind::Entry } else { Kind::Return });
        let got = u64_at(m, s + slot::INTS);
        let want = if kind == Kind::Entry { t / 2 } else { (t / 2).wrapping_add(regs_for(&r)[1]) };
        assert_eq!(got, want);
    }
}

/// `if a != 0 { a += b }; return a`: a leaf whose only exit is its RET, followed by padding.
fn branchy_leaf(at: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut out = a.create_label();
    a.test(rax, rax).unwrap();
    a.je(out).unwrap();
    a.add(rax, rbx).unwrap();
    a.set_label(&mut out).unwrap();
    a.ret().unwrap();
    let mut code = a.assemble(at).unwrap();
    code.resize(32, 0xcc);
    code
}

#[test]
fn exit_jump_over_the_ret_and_padding() {
    let r = rig_with(16, branchy_leaf, false, &CapturePlan::all());
    for call in 0..4u64 {
        let mut regs = regs_for(&r);
        regs[0] = call;
        let before = regs;
        // SAFETY: as above.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[0], if call == 0 { 0 } else { call.wrapping_add(before[1]) });
        assert_eq!(regs[1..12], before[1..12]);
        assert_eq!(regs[13..21], before[13..21]);
    }
    let m = r.ring.bytes();
    let recs = published(&r);
    assert_eq!(recs.len(), 8, "an entry and a return per call, on both paths");
    for (t, &s) in recs.iter().enumerate() {
        let kind = Kind::from_u8(m[s + slot::KIND]).unwrap();
        assert_eq!(kind, if t % 2 == 0 { Kind::Entry } else { Kind::Return });
        let call = t as u64 / 2;
        let want = match kind {
            Kind::Entry => call,
            _ if call == 0 => 0,
            _ => call.wrapping_add(regs_for(&r)[1]),
        };
        assert_eq!(u64_at(m, s + slot::INTS), want, "RAX of {kind:?} {call}");
    }
}

#[test]
fn full_ring_drops_and_counts() {
    let r = rig(0x18, 4);
    for _ in 0..10 {
        let mut regs = regs_for(&r);
        let before = regs;
        // SAFETY: as above.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12]);
    }
    // Two sub-rings of four slots: 20 records, at least 12 dropped as "full".
    let head = total(&r, sub::HEAD);
    assert!(head <= 8);
    assert_eq!(head + total(&r, sub::DROPPED) + total(&r, sub::CONTENDED), 20, "every record written or counted");
    assert_eq!(total(&r, sub::CONTENDED), 0);
    // And by site: the entry trampoline records as site 7, the return one as site 8.
    let m = r.ring.bytes();
    let by_site = |s: usize| u64_at(m, r.layout.site_drops_offset() + 8 * s);
    assert_eq!(by_site(7) + by_site(8), total(&r, sub::DROPPED), "every drop counted by site");
    assert_eq!(by_site(0), 0);
}

#[test]
fn disabled_ring_records_nothing() {
    let mut r = rig(0x18, 8);
    r.ring.bytes_mut()[header::ENABLED] = 0;
    let mut regs = regs_for(&r);
    // SAFETY: as above.
    unsafe { call_with(&mut regs) };
    assert_eq!(total(&r, sub::HEAD), 0);
}

#[test]
fn concurrent_writers_lose_no_records() {
    let r = rig(0x18, 1 << 19);
    let threads = 8;
    let calls = 25_000u64;
    std::thread::scope(|s| {
        for _ in 0..threads {
            let r = &r;
            s.spawn(move || {
                for _ in 0..calls {
                    let mut regs = regs_for(r);
                    // SAFETY: as above.
                    unsafe { call_with(&mut regs) };
                }
            });
        }
    });
    let head = total(&r, sub::HEAD);
    let full = total(&r, sub::DROPPED);
    let contended = total(&r, sub::CONTENDED);
    eprintln!("head {head} full {full} contended {contended}");
    assert_eq!(head + full + contended, 2 * threads * calls, "every record written or counted");
    assert_eq!(full, 0);
    // Rare, even with eight threads on one sub-ring (writers of a P never race in Go) and
    // the machine busy with other tests.
    assert!(contended * 1_000 < head, "contention drops are rare: {contended} of {head}");
}

/// Strings are copied (bounded), never read past their length, and RCX/RSI/RDI, used
/// for the copy, come back unchanged.
#[test]
fn bounded_string_copies() {
    // A string argument in (RBX, RCX), as in `func f(x int, s string)`.
    let plan = CapturePlan {
        ints: 0x1ff,
        copies: vec![ByteCopy { ptr: 1, len: 2, max: 8, dest: 0 }],
        ..CapturePlan::default()
    };
    let r = rig_with(64, leaf_function, false, &plan);
    let text = b"hello, trampolines";
    let cases: [(u64, u64); 5] = [
        (text.as_ptr() as u64, 5),        // short
        (text.as_ptr() as u64, 18),       // longer than max: 8 copied
        (text.as_ptr() as u64, 0),        // empty
        (0, 7),                           // nil pointer (never valid Go, still no fault)
        (text.as_ptr() as u64, u64::MAX), // negative length
    ];
    for (ptr, len) in cases {
        let mut regs = regs_for(&r);
        regs[1] = ptr;
        regs[2] = len;
        let before = regs;
        // SAFETY: as above; the copy reads at most 8 bytes of `text`.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12], "registers (RCX/RSI/RDI included) preserved");
    }
    let m = r.ring.bytes();
    let recs = published(&r);
    let entries: Vec<usize> = recs.iter().copied().filter(|&s| m[s + slot::KIND] == Kind::Entry as u8).collect();
    assert_eq!(entries.len(), 5);
    let data = |s: usize, n: usize| m[s + slot::DATA..s + slot::DATA + n].to_vec();
    assert_eq!(data(entries[0], 8), b"hello\0\0\0");
    assert_eq!(data(entries[1], 8), b"hello, t");
    for &s in &entries[2..] {
        assert_eq!(data(s, 8), [0u8; 8], "nothing copied");
    }
}

/// The trace-context operations, run in one trampoline in the order a request meets them:
/// an incoming `traceparent` line, the server span, a client span, the header written into
/// a `bufio.Writer`-shaped buffer, and a field read through a pointer.
#[test]
fn trace_context_operations() {
    use ring_abi::span_ids as ids;
    use trampolines::codegen::{Fetch, FieldCopy, Op};
    let write_fn = 0x4455_6677u64;
    let mut ops = http_server_to_client(write_fn);
    ops.extend([
        Op::Field(FieldCopy {
            reg: 2,
            path: vec![0],
            off: 8,
            fetch: Fetch::Str { max: 4 },
            dest: 200,
            when: Vec::new(),
            keep_on_miss: false,
        }),
        Op::Field(FieldCopy {
            reg: 2,
            path: vec![16],
            off: 0,
            fetch: Fetch::Word,
            dest: 220,
            when: Vec::new(),
            keep_on_miss: false,
        }),
    ]);
    let plan = CapturePlan { ints: 0x1ff, ops, ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let line = b"Traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let map = Box::new([0u64; 8]);
    let url_text = b"/items/42";
    let url = Box::new([0u64, url_text.as_ptr() as u64, url_text.len() as u64]);
    // A request: [0] = *URL, [8] = the header map, [16] = nil pointer.
    let req = Box::new([url.as_ptr() as u64, map.as_ptr() as u64, 0]);
    let itab = Box::new([0u64, 0, 0, write_fn]);
    let mut buf = vec![b'.'; 128];
    // bufio.Writer: err (16 bytes), buf (ptr, len, cap), n.
    let bw = Box::new([0u64, 0, buf.as_mut_ptr() as u64, 128, 128, 10]);
    let call = |line: &[u8]| {
        let mut regs = regs_for(&r);
        regs[0] = line.as_ptr() as u64;
        regs[1] = line.len() as u64;
        regs[2] = req.as_ptr() as u64;
        regs[3] = map.as_ptr() as u64;
        regs[4] = itab.as_ptr() as u64;
        regs[5] = bw.as_ptr() as u64;
        let before = regs;
        // SAFETY: every pointer handed to the trampoline is to live test memory.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12], "registers preserved");
    };
    call(line);
    let m = r.ring.bytes();
    let recs = published(&r);
    assert_eq!(recs.len(), 1);
    let d = |off: usize, n: usize| std::str::from_utf8(&m[recs[0] + slot::DATA + off..][..n]).unwrap().to_string();
    let word = |off: usize| u64::from_le_bytes(m[recs[0] + slot::DATA + off..][..8].try_into().unwrap());
    assert_eq!(d(ids::TRACE, 32), "0af7651916cd43dd8448eb211c80319c", "incoming trace continued");
    assert_eq!(d(ids::PARENT, 16), "b7ad6b7169203331");
    assert_eq!(word(ids::PARENT_KIND), 1);
    let server = d(ids::SPAN, 16);
    assert!(server.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{server}");
    assert_eq!(d(80 + ids::TRACE, 32), "0af7651916cd43dd8448eb211c80319c", "client in the same trace");
    assert_eq!(d(80 + ids::PARENT, 16), server, "client is the server span's child");
    assert_eq!(word(80 + ids::PARENT_KIND), 2);
    let client = d(80 + ids::SPAN, 16);
    assert_ne!(client, server);
    assert_eq!(word(160), 1, "header injected");
    assert_eq!(d(168, 16), client);
    let expect = format!("traceparent: 00-0af7651916cd43dd8448eb211c80319c-{client}-01\r\n");
    assert_eq!(&buf[10..80], expect.as_bytes());
    assert_eq!(&buf[..10], b"..........");
    assert_eq!(&buf[80..], &[b'.'; 48][..]);
    assert_eq!(bw[5], 80, "n advanced by the line");
    assert_eq!(word(200), 9, "string length");
    assert_eq!(d(208, 4), "/ite", "bounded copy through a pointer");
    assert_eq!(word(220), 0, "nil pointer on the way: zero");

    // No header this time: a new trace; the header was already used: no second line; and
    // no room left for one either way.
    call(b"User-Agent: x");
    let recs = published(&r);
    assert_eq!(recs.len(), 2);
    let s = recs[1];
    let d2 = |off: usize, n: usize| std::str::from_utf8(&m[s + slot::DATA + off..][..n]).unwrap().to_string();
    assert_ne!(d2(ids::TRACE, 32), "0af7651916cd43dd8448eb211c80319c");
    assert!(d2(ids::TRACE, 32).bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(u64::from_le_bytes(m[s + slot::DATA + ids::PARENT_KIND..][..8].try_into().unwrap()), 0);
    assert_eq!(d2(80 + ids::TRACE, 32), d2(ids::TRACE, 32));
    assert_eq!(u64::from_le_bytes(m[s + slot::DATA + 160..][..8].try_into().unwrap()), 0, "no room: no line");
    assert_eq!(bw[5], 80);
}

/// `tracestate` travels with the trace: an incoming value (HTTP/1 line in R9/R10, either
/// before or after the `traceparent` line in RAX/RBX) goes out after the `traceparent` of
/// the trace's outgoing request, where the buffer has room; a value of another trace, an
/// unsafe or too long one, is never written.
#[test]
fn tracestate_goes_out_after_the_traceparent_of_its_trace() {
    use trampolines::codegen::Op;
    let write_fn = 0x4455_6677u64;
    let ops = |state_first: bool| {
        let (tp, ts) = (Op::StashTraceparent { ptr: 0, len: 1 }, Op::StashTraceparent { ptr: 6, len: 7 });
        let mut v = if state_first { vec![ts, tp] } else { vec![tp, ts] };
        v.push(Op::AdoptTracestate);
        v.extend(http_server_to_client(write_fn).into_iter().skip(1));
        v
    };
    let trace = "0af7651916cd43dd8448eb211c80319c";
    for state_first in [false, true] {
        let plan = CapturePlan { ints: 0x1ff, ops: ops(state_first), ..CapturePlan::default() };
        let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
        // One request: (bytes written, the record's tracestate word).
        let call = |trace: &str, state: &[u8], cap: u64| state_request(&r, write_fn, trace, state, cap);
        let why = if state_first { "tracestate first" } else { "traceparent first" };
        let (out, word) = call(trace, b"Tracestate:  congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", 1024);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(&text[70..], "tracestate: congo=t61rcWkgMzE,rojo=00f067aa0ba902b7\r\n", "{why}");
        assert_eq!(word, 14 + "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".len() as i64, "{why}");
        // W3C's longest value, in a buffer with room for it, and in one without.
        let long = format!("tracestate: {}", "k=v,".repeat(128).trim_end_matches(','));
        let (out, word) = call(trace, long.as_bytes(), 1024);
        assert_eq!(out.len(), 70 + 511 + 14, "{why}");
        assert_eq!(&out[70..], format!("{long}\r\n").as_bytes(), "{why}");
        assert_eq!(word, 511 + 14);
        let (out, word) = call(trace, long.as_bytes(), 70 + 511 + 14 + 7);
        assert_eq!((out.len(), word), (70, -1), "{why}: no room for the copy's overrun");
        // Another trace does not get it; nor does a value that could end the line, or a
        // value over 512 bytes (the trace's last one stays).
        let other = "1af7651916cd43dd8448eb211c80319d";
        let (out, word) = call(other, b"user-agent: x", 1024);
        assert_eq!((out.len(), word), (70, 0), "{why}: another trace");
        for bad in [&b"tracestate: a=b\r\nx: y"[..], b"tracestate: a=\x80", &[b'k'; 530]] {
            let mut line = bad.to_vec();
            if bad[0] == b'k' {
                line.splice(..0, b"tracestate: k=".iter().copied());
            }
            let (out, _) = call(trace, &line, 1024);
            assert_eq!(&out[70..], format!("{long}\r\n").as_bytes(), "{why}: {:?} not kept", &bad[..8]);
        }
    }
}

/// One request through a rig of the plan the tracestate tests share: a `traceparent` line
/// for `trace` (RAX/RBX), the line `state` (R9/R10), and the request's headers written to a
/// `bufio.Writer` of `cap` bytes. Returns what it wrote and the record's tracestate word.
fn state_request(r: &Rig, write_fn: u64, trace: &str, state: &[u8], cap: u64) -> (Vec<u8>, i64) {
    let line = format!("traceparent: 00-{trace}-b7ad6b7169203331-01");
    let map = Box::new([0u64; 8]);
    let req = Box::new([0u64, map.as_ptr() as u64, 0]);
    let itab = Box::new([0u64, 0, 0, write_fn]);
    let mut buf = vec![b'.'; 1024];
    let bw = Box::new([0u64, 0, buf.as_mut_ptr() as u64, cap, cap, 0]);
    let mut regs = regs_for(r);
    regs[0] = line.as_ptr() as u64;
    regs[1] = line.len() as u64;
    regs[2] = req.as_ptr() as u64;
    regs[3] = map.as_ptr() as u64;
    regs[4] = itab.as_ptr() as u64;
    regs[5] = bw.as_ptr() as u64;
    regs[6] = state.as_ptr() as u64;
    regs[7] = state.len() as u64;
    let before = regs;
    // SAFETY: every pointer handed to the trampoline is to live test memory.
    unsafe { call_with(&mut regs) };
    assert_eq!(regs[1..12], before[1..12], "registers preserved");
    // The copy moves 8 bytes at a time: at most 8 bytes past `n` (within the room it asked).
    assert!(buf[bw[5] as usize + 8..].iter().all(|&b| b == b'.') || cap < 1024, "at most 8 bytes past n");
    let m = r.ring.bytes();
    let s = *published(r).last().unwrap();
    let word = i64::from_le_bytes(m[s + slot::DATA + 184..][..8].try_into().unwrap());
    (buf[..bw[5] as usize].to_vec(), word)
}

/// Five live traces whose ids pick the same set of the trace table: the least recently
/// stored one gives way, the other four keep their values.
#[test]
fn tracestate_table_keeps_four_traces_per_set() {
    use ring_abi::tracestate as ts;
    use trampolines::codegen::Op;
    let write_fn = 0x4455_6677u64;
    let mut ops = vec![Op::StashTraceparent { ptr: 0, len: 1 }, Op::StashTraceparent { ptr: 6, len: 7 }];
    ops.push(Op::AdoptTracestate);
    ops.extend(http_server_to_client(write_fn).into_iter().skip(1));
    let plan = CapturePlan { ints: 0x1ff, ops, ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let call = |trace: &str, state: &[u8]| state_request(&r, write_fn, trace, state, 1024).0[70..].to_vec();
    // The set a trace id picks, as the trampolines hash it.
    let set = |t: &str| {
        let low = u64::from_le_bytes(t.as_bytes()[24..32].try_into().unwrap());
        low.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - (ts::TRACES / ts::WAYS).trailing_zeros())
    };
    let trace = |i: u32| format!("0af7651916cd43dd8448eb21{i:08x}");
    let first = set(&trace(0));
    let same: Vec<String> = (0..).map(trace).filter(|t| set(t) == first).take(5).collect();
    for (i, t) in same.iter().enumerate() {
        assert_eq!(call(t, format!("tracestate: v={i}").as_bytes()), format!("tracestate: v={i}\r\n").as_bytes());
    }
    assert_eq!(call(&same[0], b"user-agent: x"), b"", "the oldest gave way");
    for (i, t) in same.iter().enumerate().skip(1) {
        assert_eq!(call(t, b"user-agent: x"), format!("tracestate: v={i}\r\n").as_bytes(), "trace {i} kept");
    }
    // A trace's new value replaces its own entry, not another's.
    assert_eq!(call(&same[1], b"tracestate: v=new"), b"tracestate: v=new\r\n");
    for (i, t) in same.iter().enumerate().skip(2) {
        assert_eq!(call(t, b"user-agent: x"), format!("tracestate: v={i}\r\n").as_bytes(), "trace {i} kept");
    }
}

/// A Go-shaped function with a frame whose body writes header lines as `writeSubset`
/// would: the R11 bytes at RDX go into the `bufio.Writer`-shaped writer in R8 at its fill
/// index, which moves past them; with RDX nil, the writer is flushed (its index back to 0).
fn sets_n(at: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut morestack, mut flush, mut out) = (a.create_label(), a.create_label(), a.create_label());
    a.cmp(rsp, qword_ptr(r14 + 16)).unwrap();
    a.jbe(morestack).unwrap();
    a.push(rbp).unwrap();
    a.mov(rbp, rsp).unwrap();
    a.sub(rsp, 24).unwrap();
    a.test(rdx, rdx).unwrap();
    a.je(flush).unwrap();
    a.mov(rdi, qword_ptr(r8 + 16)).unwrap();
    a.add(rdi, qword_ptr(r8 + 40)).unwrap();
    a.mov(rsi, rdx).unwrap();
    a.mov(rcx, r11).unwrap();
    a.rep().movsb().unwrap();
    a.add(qword_ptr(r8 + 40), r11).unwrap();
    a.jmp(out).unwrap();
    a.set_label(&mut flush).unwrap();
    a.mov(qword_ptr(r8 + 40), 0).unwrap();
    a.set_label(&mut out).unwrap();
    a.add(rsp, 24).unwrap();
    a.pop(rbp).unwrap();
    a.ret().unwrap();
    a.set_label(&mut morestack).unwrap();
    a.int3().unwrap();
    let mut code = a.assemble(at).unwrap();
    code.resize(128, 0xcc);
    code
}

/// HTTP/1 stand-down: after the header lines are written (the function's return), a
/// `traceparent` line of the application's own after ours takes ours (and its tracestate)
/// back out of the buffer; without one, or once the buffer was flushed, ours stays.
#[test]
fn an_application_traceparent_line_takes_ours_back_out() {
    use trampolines::codegen::Op;
    let write_fn = 0x4455_6677u64;
    let mut ops = vec![Op::StashTraceparent { ptr: 0, len: 1 }, Op::StashTraceparent { ptr: 6, len: 7 }];
    ops.push(Op::AdoptTracestate);
    ops.extend(http_server_to_client(write_fn).into_iter().skip(1));
    let entry = CapturePlan { ints: 0x1ff, ops, ..CapturePlan::default() };
    let ret =
        CapturePlan { ops: vec![Op::UndoOwnTraceparent { buf_off: 16, n_off: 40, dest: 0 }], ..CapturePlan::default() };
    let r = rig_with_plans(64, sets_n, true, &entry, &ret);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    for (app, flushed, taken) in [
        (&b"Accept: */*\r\nTraceparent: 00-11111111111111111111111111111111-2222222222222222-01\r\n"[..], false, true),
        (b"Accept: */*\r\ntraceparentx: y\r\nX-Traceparent: 00-1\r\n", false, false),
        (b"Accept: */*\r\nTRACEPARENT:00-1\r\n", false, true),
        (b"Traceparent: 00-11111111111111111111111111111111-2222222222222222-01\r\n", true, false),
    ] {
        let line = format!("traceparent: 00-{trace}-b7ad6b7169203331-01");
        let state = b"tracestate: a=b";
        let map = Box::new([0u64; 8]);
        let req = Box::new([0u64, map.as_ptr() as u64, 0]);
        let itab = Box::new([0u64, 0, 0, write_fn]);
        let mut buf = vec![b'.'; 1024];
        buf[..5].copy_from_slice(b"GET /");
        let bw = Box::new([0u64, 0, buf.as_mut_ptr() as u64, 1024, 1024, 5]);
        let mut regs = regs_for(&r);
        regs[0] = line.as_ptr() as u64;
        regs[1] = line.len() as u64;
        regs[2] = req.as_ptr() as u64;
        regs[3] = map.as_ptr() as u64;
        regs[4] = itab.as_ptr() as u64;
        regs[5] = bw.as_ptr() as u64;
        regs[6] = state.as_ptr() as u64;
        regs[7] = state.len() as u64;
        // The entry writes our lines at 5, the body the application's after them.
        regs[8] = app.len() as u64;
        regs[9] = if flushed { 0 } else { app.as_ptr() as u64 };
        // SAFETY: every pointer handed to the trampoline is to live test memory.
        unsafe { call_with(&mut regs) };
        let m = r.ring.bytes();
        let x = *published(&r).last().unwrap();
        let word = u64::from_le_bytes(m[x + slot::DATA..][..8].try_into().unwrap());
        let text = String::from_utf8_lossy(&buf[..bw[5] as usize]).into_owned();
        if flushed {
            assert_eq!((word, bw[5]), (2, 0), "flushed: nothing taken back");
        } else if taken {
            assert_eq!(word, 1, "{text}");
            let taken = u64::from_le_bytes(m[x + slot::DATA + 8..][..8].try_into().unwrap());
            assert_eq!(taken, 70 + 14 + 3, "both lines taken out");
            assert_eq!(text.as_bytes(), [&b"GET /"[..], app].concat(), "ours taken out, the rest moved down");
        } else {
            assert_eq!(word, 0, "{text}");
            assert!(text.starts_with(&format!("GET /traceparent: 00-{trace}-")), "{text}");
            assert!(text[5 + 70..].starts_with("tracestate: a=b\r\n"), "{text}");
            assert!(text.ends_with(std::str::from_utf8(app).unwrap()), "{text}");
        }
    }
}

/// An HTTP server span from a header line (RAX, RBX), its client span for the request in
/// RCX (header map at +8), and the `traceparent` line written for the map in RDI to the
/// `bufio.Writer`-shaped writer (itab RSI, data R8); ids at 0 and 80, the outcome at 160.
fn http_server_to_client(write_fn: u64) -> Vec<trampolines::codegen::Op> {
    use trampolines::codegen::Op;
    vec![
        Op::StashTraceparent { ptr: 0, len: 1 },
        Op::ServerBegin { dest: 0 },
        Op::ClientBegin { req: 2, header_off: 8, dest: 80 },
        Op::InjectTraceparent { map: 3, itab: 4, data: 5, write_fn, buf_off: 16, n_off: 40, dest: 160 },
    ]
}

/// The sampled flag: an incoming context's flags go on to the server span, its client span
/// and the `traceparent` it sends, for a parent-based sampler; a root, or any span for
/// another sampler, gets the sampler's decision on its trace id; flags that are not two
/// hex digits make the header invalid.
#[test]
fn sampled_flags_follow_the_parent_and_the_sampler() {
    use ring_abi::span_ids as ids;
    use trampolines::codegen::Sampling;
    let write_fn = 0x4455_6677u64;
    let plan = CapturePlan { ints: 0x1ff, ops: http_server_to_client(write_fn), ..CapturePlan::default() };
    // One request through a rig built for `sampling`: (trace id, server flags, client
    // flags, the flags of the line sent).
    let run = |sampling: Sampling, line: &[u8]| -> (String, String, String, String) {
        SAMPLING.with(|s| s.set(sampling));
        let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
        SAMPLING.with(|s| s.set(Sampling::default()));
        let map = Box::new([0u64; 8]);
        let req = Box::new([0u64, map.as_ptr() as u64, 0]);
        let itab = Box::new([0u64, 0, 0, write_fn]);
        let mut buf = vec![b'.'; 128];
        let bw = Box::new([0u64, 0, buf.as_mut_ptr() as u64, 128, 128, 0]);
        let mut regs = regs_for(&r);
        regs[0] = line.as_ptr() as u64;
        regs[1] = line.len() as u64;
        regs[2] = req.as_ptr() as u64;
        regs[3] = map.as_ptr() as u64;
        regs[4] = itab.as_ptr() as u64;
        regs[5] = bw.as_ptr() as u64;
        // SAFETY: every pointer handed to the trampoline is to live test memory.
        unsafe { call_with(&mut regs) };
        let m = r.ring.bytes();
        let s = *published(&r).last().unwrap();
        let d = |off: usize, n: usize| String::from_utf8_lossy(&m[s + slot::DATA + off..][..n]).into_owned();
        assert_eq!(bw[5], 70, "the line sent");
        let sent = String::from_utf8_lossy(&buf[..70]).into_owned();
        assert_eq!(&sent[..16], "traceparent: 00-");
        assert_eq!(&sent[65..], format!("-{}\r\n", &sent[66..68]), "{sent}");
        assert_eq!(d(80 + ids::FLAGS + 2, 6), "\0\0\0\0\0\0", "two digits in a word");
        (d(ids::TRACE, 32), d(ids::FLAGS, 2), d(80 + ids::FLAGS, 2), sent[66..68].to_string())
    };
    let header = |trace: &str, flags: &str| format!("traceparent: 00-{trace}-b7ad6b7169203331-{flags}");
    let t = "0af7651916cd43dd8448eb211c80319c";
    let parent_based = Sampling::default();
    for flags in ["00", "01", "03"] {
        let (trace, server, client, sent) = run(parent_based, header(t, flags).as_bytes());
        assert_eq!((trace.as_str(), server.as_str(), client.as_str(), sent.as_str()), (t, flags, flags, flags));
    }
    // Not hex: the header is ignored, a new (sampled) trace begins.
    let (trace, server, _, sent) = run(parent_based, header(t, "0g").as_bytes());
    assert_ne!(trace, t);
    assert_eq!((server.as_str(), sent.as_str()), ("01", "01"));
    // parentbased_always_off: a root is not sampled, a sampled parent's child is.
    let off = Sampling { parent_based: true, root_below: 0 };
    assert_eq!(run(off, b"User-Agent: x").3, "00");
    assert_eq!(run(off, header(t, "01").as_bytes()).3, "01");
    // always_off ignores the parent.
    assert_eq!(run(Sampling { parent_based: false, root_below: 0 }, header(t, "01").as_bytes()).3, "00");
    // traceidratio 0.5 (below 2^62): decided by the trace id's low 64 bits, shifted once.
    let half = Sampling { parent_based: false, root_below: 1 << 62 };
    let low = |trace: &str| u64::from_str_radix(&trace[16..], 16).unwrap();
    for (trace, want) in [("0af7651916cd43dd0000000000000001", "01"), ("0af7651916cd43dd8000000000000000", "00")] {
        assert_eq!(run(half, header(trace, "00").as_bytes()).3, want, "{trace}");
        assert_eq!((low(trace) >> 1) < 1 << 62, want == "01", "the rule the collector applies");
    }
    let mut seen = [false; 2];
    for _ in 0..64 {
        let (trace, server, client, sent) = run(half, b"User-Agent: x");
        let want = if (low(&trace) >> 1) < 1 << 62 { "01" } else { "00" };
        assert_eq!((server.as_str(), client.as_str(), sent.as_str()), (want, want, want), "{trace}");
        seen[usize::from(want == "01")] = true;
    }
    assert_eq!(seen, [true, true], "both decisions among 64 roots");
}

/// A gRPC-shaped client call up to its writer: a server span (ids at 0), the call's client
/// span on the goroutine (ids at 80), handed over with the header item in RCX and taken up
/// by this same goroutine as the writer of the item's HEADERS frame.
fn call_to_writer() -> Vec<trampolines::codegen::Op> {
    use trampolines::codegen::Op;
    vec![
        Op::ServerBegin { dest: 0 },
        Op::ClientBeginHere { dest: 80 },
        Op::ClientToRequest { key: 2 },
        Op::OutgoingFromRequest { key: 2, deref: None },
    ]
}

/// A frame in a 200-byte buffer: 9-byte header (length 0, type, flags, stream 1), a 4-byte
/// block, then dots.
fn frame(ty: u8, flags: u8) -> Vec<u8> {
    let mut b = vec![0u8, 0, 0, ty, flags, 0, 0, 0, 1, 0x82, 0x86, 0x84, 0x41];
    b.resize(200, b'.');
    b
}

/// A gRPC-shaped call: a client span started on the calling goroutine, handed over with its
/// queued header item, taken up by the writer, and its `traceparent` appended as an HPACK
/// literal to a HEADERS frame in a `Framer`-shaped buffer, only where that is safe.
#[test]
fn h2_field_appended_only_to_the_end_of_a_header_block_with_room() {
    use ring_abi::span_ids as ids;
    use trampolines::codegen::Op;
    let mut ops = call_to_writer();
    ops.push(Op::InjectH2 { framer: 3, wbuf_off: 8, after: None, dest: 160 });
    let plan = CapturePlan { ints: 0x1ff, ops, ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let item = Box::new([0u64; 4]);
    let call = |buf: &mut Vec<u8>, cap: u64| -> (u64, String, String) {
        // Framer: 8 bytes of something, then wbuf (ptr, len, cap).
        let framer = Box::new([7u64, buf.as_mut_ptr() as u64, 13, cap]);
        let mut regs = regs_for(&r);
        regs[2] = item.as_ptr() as u64;
        regs[3] = framer.as_ptr() as u64;
        let before = regs;
        // SAFETY: the item, the framer and its buffer are live test memory of `cap` bytes.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12], "registers preserved");
        let m = r.ring.bytes();
        let s = *published(&r).last().unwrap();
        let d = |off: usize, n: usize| std::str::from_utf8(&m[s + slot::DATA + off..][..n]).unwrap().to_string();
        assert_eq!(d(80 + ids::TRACE, 32), d(ids::TRACE, 32), "client in the server's trace");
        assert_eq!(d(80 + ids::PARENT, 16), d(ids::SPAN, 16));
        let word = u64::from_le_bytes(m[s + slot::DATA + 160..][..8].try_into().unwrap());
        (framer[2], d(80 + ids::TRACE, 32), if word == 1 { d(168, 16) } else { word.to_string() })
    };

    let mut buf = frame(1, 4);
    let (len, trace, span) = call(&mut buf, 200);
    assert_eq!(len, 13 + 69, "len grew by the field");
    let mut want = vec![0x00, 11];
    want.extend_from_slice(b"traceparent");
    want.push(55);
    want.extend_from_slice(format!("00-{trace}-{span}-01").as_bytes());
    assert_eq!(&buf[13..82], &want[..], "an HPACK literal without indexing");
    assert_eq!(&buf[..13], &frame(1, 4)[..13], "the frame before it untouched");
    assert!(buf[82..].iter().all(|&b| b == b'.'), "nothing past it");

    // The last CONTINUATION of a block gets it too; a HEADERS frame without END_HEADERS,
    // a padded one, a DATA frame, or one without 69 bytes of room does not.
    let mut buf = frame(9, 4);
    assert_eq!(call(&mut buf, 200).0, 82);
    for (ty, flags, cap, why) in
        [(1, 0, 200, "block continues"), (1, 4 | 8, 200, "padded"), (0, 4, 200, "DATA"), (1, 4, 81, "no room")]
    {
        let mut buf = frame(ty, flags);
        let (len, _, outcome) = call(&mut buf, cap);
        assert_eq!(len, 13, "{why}: len unchanged");
        assert!(buf[13..].iter().all(|&b| b == b'.'), "{why}: buffer untouched");
        assert_eq!(outcome, if why == "no room" { "2" } else { "0" }, "{why}");
    }
}

/// An HPACK integer with a 7-bit prefix at `b` (RFC 7541, 5.1): its value and its bytes.
fn hpack_int(b: &[u8]) -> (usize, usize) {
    let mut v = usize::from(b[0] & 0x7f);
    if v < 0x7f {
        return (v, 1);
    }
    let mut shift = 0;
    for (i, &c) in b[1..].iter().enumerate() {
        v += usize::from(c & 0x7f) << shift;
        shift += 7;
        if c & 0x80 == 0 {
            return (v, i + 2);
        }
    }
    panic!("unterminated integer");
}

/// The literal fields without indexing (new name, no Huffman coding) in `b`, decoded.
fn hpack_literals(mut b: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(b[0], 0x00, "a literal without indexing, new name");
        b = &b[1..];
        let mut s = [String::new(), String::new()];
        for part in &mut s {
            assert_eq!(b[0] & 0x80, 0, "no Huffman coding");
            let (n, at) = hpack_int(b);
            *part = String::from_utf8(b[at..at + n].to_vec()).unwrap();
            b = &b[at + n..];
        }
        let [name, value] = s;
        out.push((name, value));
    }
    out
}

/// The HTTP/2 form of `tracestate` out: an incoming field's value (name in R9/R10, value
/// in RSI/R8) becomes its trace's, and follows the `traceparent` field of the trace's
/// outgoing HEADERS frame as a literal of its own, the HPACK integer of its length one,
/// two or three bytes long, within the buffer's capacity.
#[test]
fn h2_tracestate_field_follows_the_traceparent() {
    use trampolines::codegen::Op;
    let mut ops = vec![
        Op::StashTraceparent { ptr: 0, len: 1 },
        Op::StashTraceparentField { name_ptr: 6, name_len: 7, value_ptr: 4, value_len: 5 },
        Op::AdoptTracestate,
    ];
    ops.extend(call_to_writer());
    ops.push(Op::InjectH2 { framer: 3, wbuf_off: 8, after: None, dest: 160 });
    let plan = CapturePlan { ints: 0x1ff, ops, ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let item = Box::new([0u64; 4]);
    let line = b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for (n, cap) in [(40, 1024), (126, 1024), (127, 1024), (254, 1024), (255, 1024), (512, 1024), (40, 13 + 69 + 54)] {
        let value: String = "k=v,".repeat(128)[..n].trim_end_matches([',', '=']).to_string();
        let mut buf = frame(1, 4);
        buf.resize(cap, b'.');
        let framer = Box::new([7u64, buf.as_mut_ptr() as u64, 13, cap as u64]);
        let mut regs = regs_for(&r);
        regs[0] = line.as_ptr() as u64;
        regs[1] = line.len() as u64;
        regs[2] = item.as_ptr() as u64;
        regs[3] = framer.as_ptr() as u64;
        regs[4] = value.as_ptr() as u64;
        regs[5] = value.len() as u64;
        regs[6] = b"tracestate".as_ptr() as u64;
        regs[7] = 10;
        let before = regs;
        // SAFETY: every pointer handed to the trampoline is to live test memory.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12], "registers preserved");
        let m = r.ring.bytes();
        let s = *published(&r).last().unwrap();
        let word = |off: usize| i64::from_le_bytes(m[s + slot::DATA + off..][..8].try_into().unwrap());
        assert_eq!(word(160), 1, "{n}: traceparent appended");
        let fields = hpack_literals(&buf[13..framer[2] as usize]);
        assert_eq!(fields[0].0, "traceparent");
        if cap < 1024 {
            assert_eq!((fields.len(), word(184)), (1, -1), "{n}: no room for the tracestate");
            continue;
        }
        assert_eq!(fields.len(), 2, "{n}: {fields:?}");
        assert_eq!(fields[1], ("tracestate".to_string(), value.clone()), "{n}");
        assert_eq!(word(184) as u64, framer[2] - 13 - 69, "{n}: the record counts its bytes");
        assert!(buf[framer[2] as usize + 8..].iter().all(|&b| b == b'.'), "{n}: at most 8 bytes past it");
    }
}

/// A `traceparent` the application encodes itself makes the goroutine's outgoing client
/// span stand down: the frame then goes out with the application's field alone.
#[test]
fn an_application_traceparent_stands_the_injection_down() {
    use trampolines::codegen::Op;
    let mut ops = call_to_writer();
    ops.push(Op::StandDown { name_ptr: 4, name_len: 5, dest: 160 });
    ops.push(Op::InjectH2 { framer: 3, wbuf_off: 8, after: None, dest: 168 });
    let plan = CapturePlan { ints: 0x1ff, ops, ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let item = Box::new([0u64; 4]);
    for (name, stood_down) in
        [(&b"traceparent"[..], true), (b"tracestate", false), (b"traceparenz", false), (b"", false)]
    {
        let mut buf = frame(1, 4);
        let framer = Box::new([7u64, buf.as_mut_ptr() as u64, 13, 200]);
        let mut regs = regs_for(&r);
        regs[2] = item.as_ptr() as u64;
        regs[3] = framer.as_ptr() as u64;
        regs[4] = name.as_ptr() as u64;
        regs[5] = name.len() as u64;
        let before = regs;
        // SAFETY: the item, the framer, its buffer and the name are live test memory.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12], "registers preserved");
        let m = r.ring.bytes();
        let s = *published(&r).last().unwrap();
        let word = |off: usize| u64::from_le_bytes(m[s + slot::DATA + off..][..8].try_into().unwrap());
        let name = String::from_utf8_lossy(name);
        assert_eq!(word(160), u64::from(stood_down), "{name}: stood down");
        assert_eq!(word(168), if stood_down { 0 } else { 1 }, "{name}: appended");
        assert_eq!(framer[2], if stood_down { 13 } else { 13 + 69 }, "{name}: frame length");
    }
}

/// Without room in the frame buffer, the field goes after the frame once the framer's
/// writer has it: the frame's length grows by 69, the writer's fill index too; a writer of
/// another type, or one whose buffer no longer ends with the frame (flushed), is left alone.
#[test]
fn h2_field_appended_after_the_write_when_the_frame_buffer_is_full() {
    use trampolines::codegen::{AfterWrite, Op};
    const ITAB: u64 = 0x7777_0000;
    let after = AfterWrite { w_off: 32, itab: ITAB, buf_off: 8, buf_indirect: false, fill_off: 32 };
    let mut ops = call_to_writer();
    ops.push(Op::InjectH2 { framer: 3, wbuf_off: 8, after: Some(after), dest: 160 });
    let entry = CapturePlan { ints: 0x1ff, ops, ..CapturePlan::default() };
    let ret = CapturePlan { ops: vec![Op::InjectH2After { wbuf_off: 8, after, dest: 0 }], ..CapturePlan::default() };
    let r = rig_with_plans(64, go_function_leafless, true, &entry, &ret);
    let item = Box::new([0u64; 4]);
    let mut frame = vec![0u8, 0, 4, 1, 4, 0, 0, 0, 3, 0x82, 0x86, 0x84, 0x41];
    let run = |frame: &mut Vec<u8>, itab: u64, flushed: bool| -> (Vec<u8>, u64, Vec<u8>, Vec<u8>) {
        // The writer: 8 bytes, buf (ptr, len, cap), fill; 20 bytes already in it, then the frame.
        let mut wb = vec![b'-'; 20];
        wb.extend_from_slice(frame);
        let fill = if flushed { 0 } else { wb.len() as u64 };
        wb.resize(4096, b'.');
        let writer = Box::new([0u64, wb.as_mut_ptr() as u64, 4096, 4096, fill]);
        // The framer: 8 bytes, wbuf (ptr, len = cap), w (itab, data).
        let framer = Box::new([7u64, frame.as_mut_ptr() as u64, 13, 13, itab, writer.as_ptr() as u64]);
        let mut regs = regs_for(&r);
        regs[2] = item.as_ptr() as u64;
        regs[3] = framer.as_ptr() as u64;
        // SAFETY: the item, framer, frame and writer buffer are live test memory.
        unsafe { call_with(&mut regs) };
        let m = r.ring.bytes();
        let recs = published(&r);
        let (e, x) = (recs[recs.len() - 2], recs[recs.len() - 1]);
        (wb, writer[4], m[e + slot::DATA..][..240].to_vec(), m[x + slot::DATA..][..24].to_vec())
    };
    let (wb, fill, e, x) = run(&mut frame, ITAB, false);
    assert_eq!(u64::from_le_bytes(e[160..168].try_into().unwrap()), 3, "deferred to the return");
    assert_eq!(u64::from_le_bytes(x[..8].try_into().unwrap()), 1, "appended at the return");
    assert_eq!(fill, 20 + 13 + 69);
    assert_eq!(&wb[20..23], &[0, 0, 4 + 69], "frame length grown");
    assert_eq!(&wb[23..33], &frame[3..13], "the rest of the frame untouched");
    let trace = std::str::from_utf8(&e[ring_abi::span_ids::TRACE..][..32]).unwrap();
    let span = std::str::from_utf8(&e[80 + ring_abi::span_ids::SPAN..][..16]).unwrap();
    assert_eq!(&x[8..24], span.as_bytes());
    let mut want = vec![0x00, 11];
    want.extend_from_slice(b"traceparent");
    want.push(55);
    want.extend_from_slice(format!("00-{trace}-{span}-01").as_bytes());
    assert_eq!(&wb[33..102], &want[..]);
    assert!(wb[102..].iter().all(|&b| b == b'.'));
    for (itab, flushed, why) in [(ITAB + 8, false, "another writer"), (ITAB, true, "flushed")] {
        let (wb, fill, e, x) = run(&mut frame, itab, flushed);
        assert_eq!(u64::from_le_bytes(e[160..168].try_into().unwrap()), if flushed { 3 } else { 2 }, "{why}");
        assert_eq!(u64::from_le_bytes(x[..8].try_into().unwrap()), if flushed { 2 } else { 0 }, "{why}");
        assert_eq!(fill, if flushed { 0 } else { 33 }, "{why}");
        assert_eq!(&wb[20..22], &[0, 0], "{why}");
        assert_eq!(wb[22], 4, "{why}");
        assert!(wb[33..].iter().all(|&b| b == b'.'), "{why}");
    }
}

/// The deferred form carries the `tracestate` too: both fields after the frame in the
/// writer's buffer, the frame's length grown by both.
#[test]
fn h2_tracestate_follows_the_deferred_traceparent() {
    use trampolines::codegen::{AfterWrite, Op};
    const ITAB: u64 = 0x7777_0000;
    let after = AfterWrite { w_off: 32, itab: ITAB, buf_off: 8, buf_indirect: false, fill_off: 32 };
    let mut ops = vec![
        Op::StashTraceparent { ptr: 0, len: 1 },
        Op::StashTraceparentField { name_ptr: 6, name_len: 7, value_ptr: 4, value_len: 5 },
        Op::AdoptTracestate,
    ];
    ops.extend(call_to_writer());
    ops.push(Op::InjectH2 { framer: 3, wbuf_off: 8, after: Some(after), dest: 160 });
    let entry = CapturePlan { ints: 0x1ff, ops, ..CapturePlan::default() };
    let ret = CapturePlan { ops: vec![Op::InjectH2After { wbuf_off: 8, after, dest: 0 }], ..CapturePlan::default() };
    let r = rig_with_plans(64, go_function_leafless, true, &entry, &ret);
    let item = Box::new([0u64; 4]);
    let line = b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let value = "k=v,".repeat(50) + "k=v";
    for cap in [4096u64, 20 + 13 + 69 + 200] {
        let mut frame = vec![0u8, 0, 4, 1, 4, 0, 0, 0, 3, 0x82, 0x86, 0x84, 0x41];
        let mut wb = vec![b'-'; 20];
        wb.extend_from_slice(&frame);
        let fill = wb.len() as u64;
        wb.resize(4096, b'.');
        let writer = Box::new([0u64, wb.as_mut_ptr() as u64, cap, cap, fill]);
        let framer = Box::new([7u64, frame.as_mut_ptr() as u64, 13, 13, ITAB, writer.as_ptr() as u64]);
        let mut regs = regs_for(&r);
        regs[0] = line.as_ptr() as u64;
        regs[1] = line.len() as u64;
        regs[2] = item.as_ptr() as u64;
        regs[3] = framer.as_ptr() as u64;
        regs[4] = value.as_ptr() as u64;
        regs[5] = value.len() as u64;
        regs[6] = b"tracestate".as_ptr() as u64;
        regs[7] = 10;
        // SAFETY: every pointer handed to the trampoline is to live test memory.
        unsafe { call_with(&mut regs) };
        let m = r.ring.bytes();
        let x = *published(&r).last().unwrap();
        let word = |off: usize| i64::from_le_bytes(m[x + slot::DATA + off..][..8].try_into().unwrap());
        assert_eq!(word(0), 1, "{cap}: appended at the return");
        let len = usize::from(wb[20]) << 16 | usize::from(wb[21]) << 8 | usize::from(wb[22]);
        assert_eq!(writer[4] as usize, 20 + 9 + len, "{cap}: the fill index ends the frame");
        let fields = hpack_literals(&wb[33..20 + 9 + len]);
        if cap == 4096 {
            assert_eq!(fields.len(), 2, "{fields:?}");
            assert_eq!(fields[1], ("tracestate".to_string(), value.clone()));
            assert_eq!(word(24) as usize, len - 4 - 69);
        } else {
            assert_eq!((fields.len(), word(24)), (1, -1), "no room in the writer's buffer");
        }
        assert_eq!(fields[0].0, "traceparent");
        assert!(wb[writer[4] as usize + 8..].iter().all(|&b| b == b'.'), "{cap}: at most 8 bytes past it");
    }
}

/// A Go-shaped function with a frame (so its exits are probed), of which only the shape
/// matters here.
fn go_function_leafless(at: u64) -> Vec<u8> {
    go_function(at, 24)
}

/// A guard decides before a slot is taken: lines not starting with `t` or `u` (any case),
/// shorter than its minimum (`te`), empty or nil leave no record and no trace in the
/// registers.
#[test]
fn guards_skip_records() {
    use trampolines::codegen::Guard;
    let plan = CapturePlan {
        ints: 0b11,
        guard: Some(Guard::FirstByte { ptr: 0, len: 1, min_len: 10, first: b"tu".to_vec() }),
        ..CapturePlan::default()
    };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let lines: [&[u8]; 8] =
        [b"User-Agent: x", b"Host: y", b"traceparent: z", b"", b"Accept: */*", b"TRACESTATE: a=b", b"te", b"tracestat"];
    for line in lines {
        let mut regs = regs_for(&r);
        regs[0] = line.as_ptr() as u64;
        regs[1] = line.len() as u64;
        let before = regs;
        // SAFETY: the guard reads at most the first byte of a non-empty line.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12], "registers preserved");
    }
    let mut regs = regs_for(&r);
    regs[0] = 0;
    regs[1] = 5;
    // SAFETY: a nil pointer is checked before any read.
    unsafe { call_with(&mut regs) };
    assert_eq!(published(&r).len(), 3, "user-agent, traceparent and tracestate recorded");
}

/// `Guard::Own` records only on a goroutine with an entry of its own (a pending or active
/// context), and `Guard::Tagged` only with an entry under its tagged key.
#[test]
fn goroutine_guards_follow_the_context_table() {
    use trampolines::codegen::Guard;
    let goid = 4242u64;
    for (guard, key) in [(Guard::Own, goid), (Guard::Tagged { bit: ring_abi::ctx::OUT_TAG_BIT }, goid | 1 << 61)] {
        let plan = CapturePlan { ints: 0b1, guard: Some(guard.clone()), ..CapturePlan::default() };
        let mut r =
            rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
        let call = |r: &Rig| {
            let mut regs = regs_for(r);
            // SAFETY: the guard reads the goroutine's set of the context table only.
            unsafe { call_with(&mut regs) };
        };
        call(&r);
        assert_eq!(published(&r).len(), 0, "{guard:?}: no entry, no record");
        // An entry in the goroutine's set (its low bits pick the set), in the last way.
        let sets = ring_abi::ctx::GOROUTINES / ring_abi::ctx::WAYS;
        let set = (goid as usize & (sets - 1)) * ring_abi::ctx::ENTRY * ring_abi::ctx::WAYS;
        let at = r.layout.ctx_offset() + set + 3 * ring_abi::ctx::ENTRY;
        r.ring.bytes_mut()[at..at + 8].copy_from_slice(&key.to_le_bytes());
        call(&r);
        assert_eq!(published(&r).len(), 1, "{guard:?}: an entry, a record");
        r.ring.bytes_mut()[at..at + 8].copy_from_slice(&(key ^ 1).to_le_bytes());
        call(&r);
        assert_eq!(published(&r).len(), 1, "{guard:?}: another goroutine's entry, no record");
    }
}

fn atomic_at(r: &Rig, off: usize) -> &std::sync::atomic::AtomicU64 {
    assert!(off + 8 <= r.ring.len && off.is_multiple_of(8));
    // SAFETY: an aligned word of the rig's ring mapping, shared with the trampolines only
    // through atomic instructions.
    unsafe { std::sync::atomic::AtomicU64::from_ptr(r.ring.ptr.add(off).cast()) }
}

/// Builds a rig whose writers wait `spins` PAUSE rounds for room in a full sub-ring.
fn lossless_rig(capacity: u64, spins: u32) -> Rig {
    WAIT_SPINS.with(|w| w.set(spins));
    let r = rig(0x18, capacity);
    WAIT_SPINS.with(|w| w.set(0));
    r.ring.bytes()[header::LOSSLESS..header::LOSSLESS + 8].iter().for_each(|&b| assert_eq!(b, 0));
    atomic_at(&r, header::LOSSLESS).store(1, std::sync::atomic::Ordering::Release);
    r
}

/// Lossless: a ring of four slots and a slow reader, yet every record arrives.
#[test]
fn lossless_writers_wait_for_room() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let r = lossless_rig(4, u32::MAX);
    let calls = 2_000u64;
    let done = AtomicBool::new(false);
    let mut read = 0u64;
    std::thread::scope(|s| {
        // The reader: consumes published slots in ticket order, frees them a lap ahead.
        let reader = s.spawn(|| {
            let mut next = [0u64; RINGS as usize];
            let mut n = 0u64;
            loop {
                let mut got = false;
                for (i, t) in next.iter_mut().enumerate() {
                    let seq = atomic_at(&r, r.layout.slot_offset(i as u32, *t) + slot::SEQ);
                    if seq.load(Ordering::Acquire) == *t + 1 {
                        seq.store(*t + r.layout.capacity, Ordering::Release);
                        *t += 1;
                        n += 1;
                        got = true;
                    }
                }
                if !got {
                    if done.load(Ordering::Acquire) {
                        return n;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            }
        });
        for _ in 0..calls {
            let mut regs = regs_for(&r);
            let before = regs;
            // SAFETY: as above.
            unsafe { call_with(&mut regs) };
            assert_eq!(regs[1..12], before[1..12]);
        }
        done.store(true, Ordering::Release);
        read = reader.join().unwrap();
    });
    assert_eq!(total(&r, sub::DROPPED) + total(&r, sub::CONTENDED), 0, "nothing dropped");
    assert_eq!(total(&r, sub::WAIT_TIMEOUTS), 0);
    assert_eq!(total(&r, sub::HEAD), 2 * calls);
    assert_eq!(read, 2 * calls, "every record read");
}

/// Lossless with nobody reading: the first writer to find the ring full waits its bound,
/// drops, and turns waiting off; the others drop at once. Nothing hangs.
#[test]
fn lossless_wait_is_bounded_and_then_off() {
    let r = lossless_rig(4, 10_000);
    for _ in 0..10 {
        let mut regs = regs_for(&r);
        // SAFETY: as above.
        unsafe { call_with(&mut regs) };
    }
    let lossless = atomic_at(&r, header::LOSSLESS).load(std::sync::atomic::Ordering::Acquire);
    assert_eq!(lossless, 0, "waiting turned off");
    assert_eq!(total(&r, sub::WAIT_TIMEOUTS), 1, "one wait ran out");
    let head = total(&r, sub::HEAD);
    assert_eq!(head, 4, "the sub-ring of P 1 filled");
    assert_eq!(head + total(&r, sub::DROPPED) + total(&r, sub::CONTENDED), 20, "every record written or counted");
}

/// A database-shaped call: a server span (ids at 0), then on the same goroutine a child
/// span that files nothing (ids at 80), so a second child made after it is a sibling,
/// not its child; and two field copies of one destination for two dynamic types, the
/// second keeping what the first wrote when its type does not match.
#[test]
fn child_spans_file_nothing_and_alternatives_share_a_destination() {
    use ring_abi::span_ids as ids;
    use trampolines::codegen::{Fetch, FieldCopy, Op, When};
    // RCX: an "interface" type word; RDI: its data, a struct whose first word is 42.
    let (type_a, type_b) = (0x1111u64, 0x2222u64);
    let copy = |equals: u64, keep_on_miss: bool| {
        Op::Field(FieldCopy {
            reg: 3,
            path: Vec::new(),
            off: 0,
            fetch: Fetch::Word,
            dest: 240,
            when: vec![When::reg(2, equals)],
            keep_on_miss,
        })
    };
    let ops = vec![
        Op::ServerBegin { dest: 0 },
        Op::ChildSpan { dest: 80 },
        Op::ChildSpan { dest: 160 },
        copy(type_a, false),
        copy(type_b, true),
    ];
    let plan = CapturePlan { ints: 0x1ff, ops, ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let data = Box::new([42u64]);
    let call = |ty: u64| -> (Vec<u8>, u64) {
        let mut regs = regs_for(&r);
        regs[2] = ty;
        regs[3] = data.as_ptr() as u64;
        let before = regs;
        // SAFETY: the data word is live test memory.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12], "registers preserved");
        let m = r.ring.bytes();
        let s = *published(&r).last().unwrap();
        let d = m[s + slot::DATA..][..320].to_vec();
        let word = u64::from_le_bytes(d[240..248].try_into().unwrap());
        (d, word)
    };
    let text = |d: &[u8], at: usize, n: usize| std::str::from_utf8(&d[at..at + n]).unwrap().to_string();
    for (ty, want) in [(type_a, 42), (type_b, 42), (0x3333, 0)] {
        let (d, word) = call(ty);
        assert_eq!(word, want, "type {ty:#x}");
        for child in [80, 160] {
            assert_eq!(text(&d, child + ids::TRACE, 32), text(&d, ids::TRACE, 32), "in the server's trace");
            assert_eq!(text(&d, child + ids::PARENT, 16), text(&d, ids::SPAN, 16), "the server span's child");
        }
        assert_ne!(text(&d, 80 + ids::SPAN, 16), text(&d, 160 + ids::SPAN, 16), "two spans");
    }
}

/// An empty interface's value is read as a string only when its type descriptor's kind
/// byte says it is one (go-redis's first command argument).
#[test]
fn an_interface_is_read_as_a_string_only_when_its_type_is_one() {
    use trampolines::codegen::{Fetch, FieldCopy, Op, When};
    let text = b"get";
    let header = Box::new([text.as_ptr() as u64, text.len() as u64]);
    let mut string_type = Box::new([0u8; 48]);
    string_type[23] = 24;
    let mut int_type = Box::new([0u8; 48]);
    int_type[23] = 2;
    // RBX: a []interface{} whose first element is (type, data).
    let op = Op::Field(FieldCopy {
        reg: 1,
        path: vec![8],
        off: 0,
        fetch: Fetch::Str { max: 16 },
        dest: 0,
        when: vec![When::eface_string(1, Vec::new())],
        keep_on_miss: false,
    });
    let plan = CapturePlan { ints: 0x1ff, ops: vec![op], ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let call = |ty: &[u8; 48]| -> Vec<u8> {
        let eface = Box::new([ty.as_ptr() as u64, header.as_ptr() as u64]);
        let mut regs = regs_for(&r);
        regs[1] = eface.as_ptr() as u64;
        // SAFETY: the interface, its type and its string are live test memory.
        unsafe { call_with(&mut regs) };
        let m = r.ring.bytes();
        let s = *published(&r).last().unwrap();
        m[s + slot::DATA..][..24].to_vec()
    };
    let got = call(&string_type);
    assert_eq!(u64::from_le_bytes(got[..8].try_into().unwrap()), 3);
    assert_eq!(&got[8..11], b"get");
    assert_eq!(u64::from_le_bytes(call(&int_type)[..8].try_into().unwrap()), 0, "not a string: nothing read");
}

/// A slice's first element is read only when its length is not 0: `make([]T, 0)` points at
/// the runtime's zero-size base, after which lie other variables, not a T (kafka-go's
/// `WriteMessages(ctx, msgs...)`).
#[test]
fn a_first_element_is_read_only_when_the_length_is_not_zero() {
    use trampolines::codegen::{Fetch, FieldCopy, Op, When};
    let text = b"topic";
    // RDI: the slice's array, whose first element starts with a string; RSI: its length.
    let array = Box::new([text.as_ptr() as u64, text.len() as u64]);
    let op = Op::Field(FieldCopy {
        reg: 3,
        path: Vec::new(),
        off: 0,
        fetch: Fetch::Str { max: 16 },
        dest: 0,
        when: vec![When::nonzero(4)],
        keep_on_miss: false,
    });
    let plan = CapturePlan { ints: 0x1ff, ops: vec![op], ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let call = |len: u64| -> (u64, Vec<u8>) {
        let mut regs = regs_for(&r);
        regs[3] = array.as_ptr() as u64;
        regs[4] = len;
        // SAFETY: the array is live test memory.
        unsafe { call_with(&mut regs) };
        let m = r.ring.bytes();
        let s = *published(&r).last().unwrap();
        let d = m[s + slot::DATA..][..24].to_vec();
        (u64::from_le_bytes(d[..8].try_into().unwrap()), d[8..8 + text.len()].to_vec())
    };
    let (n, bytes) = call(1);
    assert_eq!((n, bytes.as_slice()), (text.len() as u64, &text[..]), "length 1: read");
    assert_eq!(call(0).0, 0, "length 0: not read, 0 stored");
    assert_eq!(call(3).0, text.len() as u64, "length 3: read");
}

/// `Op::Stack` walks a frame-pointer chain only inside the goroutine's stack
/// (`[g.stack.lo, g.stack.hi)`), 8-aligned and rising: it stops at the first frame that is
/// not, so a garbage RBP is never dereferenced. The caller's return address (the word at
/// SP) always comes first.
#[test]
fn stacks_walk_frames_within_the_goroutine_stack_only() {
    use trampolines::codegen::Op;
    let plan = CapturePlan { ops: vec![Op::Stack { n: 8, dest: 0 }], ..CapturePlan::default() };
    let off = CapturePlan { off: true, ..CapturePlan::default() };
    let mut r = rig_with_plans(64, leaf_function, false, &plan, &off);
    // A goroutine stack of 64 words: frames of [next frame pointer, return address].
    let mut stack = vec![0u64; 64];
    let base = stack.as_ptr() as u64;
    let at = |w: usize| base + 8 * w as u64;
    (stack[8], stack[9]) = (at(16), 0xaaa1);
    (stack[16], stack[17]) = (at(24), 0xaaa2);
    // Below the stack: the walk ends after this frame.
    (stack[24], stack[25]) = (0x10, 0xaaa3);
    // A frame that points to itself: recorded once, not followed.
    (stack[40], stack[41]) = (at(40), 0xbbb1);
    r.g[0] = base;
    r.g[1] = base + 64 * 8;
    let cases: [(u64, &[u64]); 6] = [
        (at(8), &[0xaaa1, 0xaaa2, 0xaaa3]),
        (at(40), &[0xbbb1]),
        (0x5a5a, &[]),      // outside the stack
        (at(8) + 4, &[]),   // misaligned
        (at(63), &[]),      // its return address would lie past stack.hi
        (base - 4096, &[]), // below stack.lo
    ];
    for (fp, _) in &cases {
        let mut regs = regs_for(&r);
        regs[11] = *fp;
        let before = regs;
        // SAFETY: the walk reads only words of `stack`, which outlives the call.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12], "registers preserved (RAX is the sum)");
    }
    let m = r.ring.bytes();
    let entries: Vec<usize> = published(&r).into_iter().filter(|&s| m[s + slot::KIND] == Kind::Entry as u8).collect();
    assert_eq!(entries.len(), cases.len());
    for (s, (fp, want)) in entries.iter().zip(cases) {
        let word = |i: usize| u64_at(m, s + slot::DATA + 8 * i);
        let n = word(0) as usize;
        assert!(word(1) != 0, "the caller's return address first");
        let frames: Vec<u64> = (2..=n).map(word).collect();
        assert_eq!(frames, want, "rbp {fp:#x}");
    }
    drop(stack);
}

/// The Auto SDK's operations: the global tracer's flag is set and its address noted; an
/// application span gets its ids as `trace.SpanContext`s (binary, a child of the
/// goroutine's span), becomes the goroutine's context (a call under it is its child) and,
/// when it ends, gives the context from before back; on a goroutine with no span it is a
/// new trace's root, and its end leaves the goroutine with none.
#[test]
fn application_spans_take_their_context_from_the_goroutine_and_give_it_back() {
    use ring_abi::span_ids as ids;
    use trampolines::codegen::Op;
    let ops = vec![
        Op::ServerBegin { dest: 0 },
        Op::AutoEnable { flag: 3 },
        Op::AutoStart { span: 4, psc: 5, sampled: 6, sc: 7, dest: 80 },
        Op::ChildSpan { dest: 160 },
        Op::AutoEnd { span: 4 },
        Op::ChildSpan { dest: 240 },
    ];
    let plan = CapturePlan { ops, ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    let flag = Box::new([0u8; 8]);
    let span = Box::new([0u64; 4]);
    let (mut psc, mut sc) = (Box::new([0u8; 64]), Box::new([0u8; 64]));
    let sampled = Box::new([1u8; 8]);
    let (psc_at, sc_at) = (psc.as_mut_ptr() as u64, sc.as_mut_ptr() as u64);
    let call = |r: &Rig| {
        let mut regs = regs_for(r);
        regs[3] = flag.as_ptr() as u64;
        regs[4] = span.as_ptr() as u64;
        regs[5] = psc_at;
        regs[6] = sampled.as_ptr() as u64;
        regs[7] = sc_at;
        // SAFETY: every pointer handed to the trampoline is to live test memory.
        unsafe { call_with(&mut regs) };
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    call(&r);
    let m = r.ring.bytes();
    let recs = published(&r);
    let d = |off: usize, n: usize| std::str::from_utf8(&m[recs[0] + slot::DATA + off..][..n]).unwrap().to_string();
    assert_eq!(flag[0], 1, "the global tracer is told an auto-instrumentation is there");
    assert_eq!(u64_at(m, header::AUTO_FLAG), flag.as_ptr() as u64, "and the detach knows where");
    let (trace, server, app) = (d(ids::TRACE, 32), d(ids::SPAN, 16), d(80 + ids::SPAN, 16));
    assert_eq!(d(80 + ids::TRACE, 32), trace);
    assert_eq!(d(80 + ids::PARENT, 16), server, "the application's span is the server span's child");
    assert_eq!((hex(&sc[..16]), hex(&sc[16..24]), sc[24]), (trace.clone(), app.clone(), 1), "sc");
    assert_eq!((hex(&psc[..16]), hex(&psc[16..24]), psc[24]), (trace.clone(), server.clone(), 1), "psc");
    assert!(sc[25..].iter().all(|&b| b == 0) && psc[25..].iter().all(|&b| b == 0), "nothing past the flags");
    assert_eq!(sampled[0], 1, "sampled stays true");
    assert_eq!(d(160 + ids::PARENT, 16), app, "a call under the application's span is its child");
    assert_eq!(d(240 + ids::PARENT, 16), server, "after its end the server span is the context again");

    // A goroutine with no span: the application's span roots a new trace, psc stays
    // untouched, and its end leaves the goroutine without a context again.
    let ops = vec![
        Op::AutoStart { span: 4, psc: 5, sampled: 6, sc: 7, dest: 80 },
        Op::ChildSpan { dest: 160 },
        Op::AutoEnd { span: 4 },
        Op::ChildSpan { dest: 240 },
    ];
    let plan = CapturePlan { ops, ..CapturePlan::default() };
    let r = rig_with_plans(64, leaf_function, false, &plan, &CapturePlan { off: true, ..CapturePlan::default() });
    psc.fill(0);
    call(&r);
    let m = r.ring.bytes();
    let recs = published(&r);
    let d = |off: usize, n: usize| std::str::from_utf8(&m[recs[0] + slot::DATA + off..][..n]).unwrap().to_string();
    let word = |off: usize| u64_at(m, recs[0] + slot::DATA + off);
    let (trace, app) = (d(80 + ids::TRACE, 32), d(80 + ids::SPAN, 16));
    assert_eq!(word(80 + ids::PARENT_KIND), 0, "a root");
    assert!(psc.iter().all(|&b| b == 0), "no parent: psc untouched");
    assert_eq!((hex(&sc[..16]), hex(&sc[16..24])), (trace.clone(), app.clone()));
    assert_eq!((d(160 + ids::TRACE, 32), d(160 + ids::PARENT, 16)), (trace.clone(), app));
    assert_eq!(word(240 + ids::PARENT_KIND), 0, "after its end the goroutine has no context");
    assert_ne!(d(240 + ids::TRACE, 32), trace);
}

/// Stats mode: every call counted in the block of the thread's P (g.m.p.id = 1), its
/// latency in the histogram, a non-nil `error` result (here RAX) counted, every register
/// but R12/R13 unchanged, no record written, and every frame entry taken back; a thread
/// without a P counts a missed call and touches nothing else.
#[test]
fn stats_count_calls_latency_and_errors() {
    use ring_abi::stats as st;
    use trampolines::codegen::{ErrorAt, StatsProbe};
    let entry = CapturePlan { stats: Some(StatsProbe { timed: true, error: None }), ..CapturePlan::default() };
    let ret = CapturePlan {
        stats: Some(StatsProbe { timed: false, error: Some(ErrorAt::Reg(0)) }),
        ..CapturePlan::default()
    };
    RETURN_SITE.with(|s| s.set(7));
    let leaf = |at| leaf_function(at);
    let go = |at| go_function(at, 0x18);
    let rigs = [rig_with_plans(64, go, true, &entry, &ret), rig_with_plans(64, leaf, false, &entry, &ret)];
    RETURN_SITE.with(|s| s.set(8));
    for r in rigs {
        let block = r.layout.stats_block_offset(7, 1);
        let n = 1000u64;
        let mut errors = 0;
        for call in 0..n {
            let mut regs = regs_for(&r);
            regs[0] = call;
            // RAX + RBX = 0 (no error) for every third call.
            if call % 3 == 0 {
                regs[1] = 0u64.wrapping_sub(call);
            } else {
                errors += 1;
            }
            let before = regs;
            // SAFETY: the rig's function follows the register ABI.
            unsafe { call_with(&mut regs) };
            assert_eq!(regs[0], call.wrapping_add(before[1]));
            assert_eq!(regs[1..12], before[1..12], "registers but R12/R13 unchanged");
            assert_eq!(regs[13..21], before[13..21], "X0-X7 unchanged");
        }
        let m = r.ring.bytes();
        assert_eq!(u64_at(m, block + st::CALLS), n);
        assert_eq!(u64_at(m, block + st::ERRORS), errors);
        assert_eq!(u64_at(m, block + st::UNTIMED), 0);
        let hist: u64 = (0..st::BUCKETS).map(|b| u64_at(m, block + st::HIST + 8 * b)).sum();
        assert_eq!(hist, n, "every return timed");
        let (sum, max) = (u64_at(m, block + st::SUM), u64_at(m, block + st::MAX));
        assert!(max > 0 && sum >= max, "sum {sum} max {max}");
        let top = (0..st::BUCKETS).rev().find(|&b| u64_at(m, block + st::HIST + 8 * b) > 0).unwrap();
        assert_eq!(top, st::bucket(max), "the largest latency is in the highest bucket used");
        assert_eq!(u64_at(m, r.layout.stats_block_offset(7, 0) + st::CALLS), 0, "P 0's block untouched");
        let frames = r.layout.stats_offset();
        assert!(
            (0..st::FRAME_SETS * st::WAYS).all(|i| u64_at(m, frames + i * st::FRAME_ENTRY) == 0),
            "entries taken back"
        );
        assert_eq!(total(&r, sub::HEAD), 0, "no record");
        assert_eq!(u64_at(m, r.layout.stats_missed_offset(7)), 0);
        assert_eq!(u64_at(m, block + st::PERIOD), 0, "timed calls never too often: every call timed");
        // Sampling: timed calls always "too often" (MIN_GAP huge): the period doubles at
        // each timed call, one in 2, 4, 8... timed; the counts stay exact.
        let ring = r.ring.ptr;
        let set = |off: usize, v: u64| {
            // SAFETY: the rig's ring mapping, an aligned word in bounds.
            unsafe { *(ring.add(block + off) as *mut u64) = v }
        };
        set(st::MIN_GAP, u64::MAX);
        let call = || {
            let mut regs = regs_for(&r);
            // SAFETY: as above.
            unsafe { call_with(&mut regs) };
        };
        let (mut skip, mut period, mut timed) = (0i64, 0u64, 0u64);
        for _ in 0..4000 {
            call();
            skip -= 1;
            if skip < 0 {
                timed += 1;
                period = if period < st::MAX_PERIOD { 2 * period + 1 } else { period };
                skip = period as i64;
            }
        }
        let m = r.ring.bytes();
        let hist2: u64 = (0..st::BUCKETS).map(|b| u64_at(m, block + st::HIST + 8 * b)).sum();
        assert_eq!(u64_at(m, block + st::CALLS), n + 4000);
        assert_eq!(hist2 - hist, timed, "timed calls: one in a growing power of two");
        assert_eq!(timed, 11, "calls 1, 2-3, 4-7 ... 1024-2047 timed: 2^11 - 1 < 4000 < 2^12 - 1");
        assert_eq!(u64_at(m, block + st::PERIOD), period);
        assert_eq!(u64_at(m, block + st::UNTIMED), 4000 - timed);
        // Timed calls far apart (MIN_GAP 1 tick): the period halves at each timed call,
        // back to every call within the countdown left, then 1023 + 511 + ... calls.
        set(st::MIN_GAP, 1);
        for _ in 0..4100 {
            call();
        }
        assert_eq!(u64_at(r.ring.bytes(), block + st::PERIOD), 0, "back to timing every call");
        let m = r.ring.bytes();
        assert!((0..st::FRAME_SETS * st::WAYS).all(|i| u64_at(m, frames + i * st::FRAME_ENTRY) == 0));
        let n = n + 8100;
        // No P: missed, nothing else.
        let m_ptr = r.g[48 / 8] as *mut u64;
        // SAFETY: the rig's m, a live box.
        unsafe { *m_ptr.add(208 / 8) = 0 };
        let mut regs = regs_for(&r);
        let before = regs;
        // SAFETY: as above.
        unsafe { call_with(&mut regs) };
        assert_eq!(regs[1..12], before[1..12]);
        let m = r.ring.bytes();
        assert_eq!(u64_at(m, r.layout.stats_missed_offset(7)), 1);
        assert_eq!(u64_at(m, block + st::CALLS), n);
    }
}
