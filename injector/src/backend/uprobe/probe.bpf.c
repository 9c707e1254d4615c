// SPDX-License-Identifier: GPL-2.0
// inject's uprobe program: one program, attached at every probed function's entry and at
// each of its RET instructions, driven by the capture plan of the attach point (an array
// map indexed by the attach cookie). It records what the trampolines record (docs/uprobe.md):
// the register-ABI integer registers, bounded copies of the bytes (pointer, length)
// registers point to, words and strings read through typed pointers, the goroutine id
// and stack depth from R14's g, frame-pointer return addresses, and a CLOCK_MONOTONIC
// time stamp, into a BPF ring buffer. Every read of the target's memory goes through
// bpf_probe_read_user, which cannot fault. The layouts below are mirrored by
// injector/src/backend/uprobe/abi.rs (a test checks the sizes).
//
// Built by `cargo xtask bpf` (clang-19 -O2 -target bpf -mcpu=v3, no debug info, so the
// object depends on nothing but this file); `cargo xtask bpf --check` and the uprobe tests
// rebuild it and compare with the checked-in probe.bpf.o.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int s32;
typedef long long s64;
typedef unsigned long long u64;

#define SEC(name) __attribute__((section(name), used))
#define INLINE static inline __attribute__((always_inline))

// linux/bpf.h, stable ABI.
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_ARRAY 6
#define BPF_MAP_TYPE_RINGBUF 27

// x86-64 struct pt_regs, as the kernel hands it to a uprobe program.
struct pt_regs {
    u64 r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};

// Helper ids from linux/bpf.h (stable ABI).
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static u32 (*bpf_get_smp_processor_id)(void) = (void *)8;
static long (*bpf_probe_read_user)(void *dst, u32 size, const void *src) = (void *)112;
static long (*bpf_ringbuf_output)(void *ring, void *data, u64 size, u64 flags) = (void *)130;
static u64 (*bpf_get_attach_cookie)(void *ctx) = (void *)174;

// Legacy map definitions (section "maps"): no BTF needed, so no debug info in the object.
struct map_def {
    u32 type, key_size, value_size, max_entries, map_flags;
};

#define MAX_COPIES 8
#define MAX_FIELDS 16
#define MAX_PATH 4
#define MAX_WHEN 2
#define MAX_FRAMES 32
// Bytes of copied data a record may carry.
#define DATA_MAX 4096
#define NINTS 9

// A bounded copy of the bytes a (pointer, length) register pair points to.
struct copy {
    u8 ptr, len;
    u16 max, dest, pad;
};

#define WHEN_HAS_OFF 1
#define WHEN_BYTE 2
#define WHEN_DIFFERS 4
#define WHEN_ABOVE 8
// A condition on a word: the register's value, or after following path (each pointer
// nil-checked) the word (or byte) at off, equals (or differs from, or is above, unsigned:
// a slice's length and an element's index) equals.
struct when {
    u8 reg, npath, flags, pad;
    s32 off;
    s32 path[MAX_PATH];
    u64 equals;
};

#define FETCH_WORD 0
#define FETCH_STR 1
// A word, or a string or slice header's length and bytes, read through typed pointers.
struct field {
    u8 reg, npath, fetch, nwhen, keep_on_miss, pad0;
    u16 max, dest, pad1;
    s32 off;
    s32 path[MAX_PATH];
    struct when when[MAX_WHEN];
};

// Register number meaning the stack pointer (trampolines::codegen::SP).
#define REG_SP 0x80

struct plan {
    u32 site;
    u8 kind, ncopies, nfields, stack_n;
    u16 stack_dest, data_len;
    u32 pad;
    struct copy copies[MAX_COPIES];
    struct field fields[MAX_FIELDS];
};

// Offsets into runtime.g; enabled: records are written only while it is set, so that the
// uprobes go in and come out (one by one, each a kernel synchronisation) all at once.
struct config {
    u64 goid_off, stack_lo_off, stack_hi_off, enabled;
};

// One record, as the ring buffer carries it; data_len bytes of data follow the header.
struct event {
    u32 site;
    u8 kind, pad[3];
    u32 cpu, data_len;
    u64 goid, ktime, sp;
    u64 ints[NINTS];
    u8 data[2 * DATA_MAX];
};

#define HEADER_LEN (sizeof(struct event) - 2 * DATA_MAX)

struct map_def plans SEC("maps") = {BPF_MAP_TYPE_ARRAY, 4, sizeof(struct plan), 1, 0};
struct map_def config SEC("maps") = {BPF_MAP_TYPE_ARRAY, 4, sizeof(struct config), 1, 0};
struct map_def events SEC("maps") = {BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 24, 0};
// Records lost because the ring buffer was full, per plan (entry and return of each site).
struct map_def drops SEC("maps") = {BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0};
struct map_def scratch SEC("maps") = {BPF_MAP_TYPE_PERCPU_ARRAY, 4, sizeof(struct event), 1, 0};

char LICENSE[] SEC("license") = "GPL";

// Register i of the ABI order (saved in the record first: the context may only be read
// at constant offsets), or the stack pointer.
INLINE u64 reg(struct event *e, u64 sp, u8 i) {
    if (i == REG_SP)
        return sp;
    if (i < NINTS)
        return e->ints[i];
    return 0;
}

INLINE u64 word_at(u64 addr) {
    u64 v = 0;
    if (bpf_probe_read_user(&v, 8, (void *)addr) != 0)
        return 0;
    return v;
}

INLINE void put_word(struct event *e, u32 dest, u64 v) {
    if (dest <= DATA_MAX)
        *(u64 *)&e->data[dest] = v;
}

// Copies up to max bytes from src to data[dest]; 0 bytes when len <= 0 or src is nil.
INLINE void copy_bytes(struct event *e, u32 dest, u64 src, s64 len, u32 max) {
    if (len <= 0 || src == 0 || dest > DATA_MAX)
        return;
    u64 n = (u64)len;
    if (n > max)
        n = max;
    if (n > DATA_MAX)
        n = DATA_MAX;
    if (n == 0)
        return;
    bpf_probe_read_user(&e->data[dest], n, (void *)src);
}

INLINE int when_holds(struct event *e, u64 sp, struct when *w) {
    u64 v = reg(e, sp, w->reg);
    for (int k = 0; k < MAX_PATH; k++) {
        if (k >= w->npath)
            break;
        if (v == 0)
            return 0;
        v = word_at(v + w->path[k]);
    }
    if (w->flags & WHEN_HAS_OFF) {
        if (v == 0)
            return 0;
        if (w->flags & WHEN_BYTE) {
            u8 b = 0;
            if (bpf_probe_read_user(&b, 1, (void *)(v + w->off)) != 0)
                return 0;
            v = b;
        } else {
            v = word_at(v + w->off);
        }
    }
    if (w->flags & WHEN_ABOVE)
        return v > w->equals;
    if (w->flags & WHEN_DIFFERS)
        return v != w->equals;
    return v == w->equals;
}

INLINE void field(struct event *e, u64 sp, struct field *f) {
    for (int k = 0; k < MAX_WHEN; k++) {
        if (k >= f->nwhen)
            break;
        if (!when_holds(e, sp, &f->when[k])) {
            if (!f->keep_on_miss)
                put_word(e, f->dest, 0);
            return;
        }
    }
    u64 v = reg(e, sp, f->reg);
    for (int k = 0; k < MAX_PATH; k++) {
        if (k >= f->npath)
            break;
        if (v == 0)
            break;
        v = word_at(v + f->path[k]);
    }
    if (v == 0) {
        put_word(e, f->dest, 0);
        return;
    }
    if (f->fetch == FETCH_WORD) {
        put_word(e, f->dest, word_at(v + f->off));
        return;
    }
    u64 hdr[2] = {0, 0};
    if (bpf_probe_read_user(hdr, 16, (void *)(v + f->off)) != 0 || hdr[0] == 0 || (s64)hdr[1] <= 0) {
        put_word(e, f->dest, 0);
        return;
    }
    put_word(e, f->dest, hdr[1]);
    copy_bytes(e, f->dest + 8, hdr[0], (s64)hdr[1], f->max);
}

// Up to n return addresses: the word at SP, then the frame-pointer chain from RBP while
// each frame lies in the goroutine's stack, 8-aligned and above the one before.
INLINE void stack(struct event *e, u64 sp, u64 bp, u64 g, struct config *c, u32 n, u32 dest) {
    if (dest + 8 + 8 * MAX_FRAMES > DATA_MAX)
        return;
    u64 lo = word_at(g + c->stack_lo_off), hi = word_at(g + c->stack_hi_off);
    u64 count = 1;
    *(u64 *)&e->data[dest + 8] = word_at(sp);
    u64 fp = bp;
    for (int k = 1; k < MAX_FRAMES; k++) {
        if (k >= n)
            break;
        if ((fp & 7) != 0 || fp < lo || fp + 16 > hi)
            break;
        u64 frame[2] = {0, 0};
        if (bpf_probe_read_user(frame, 16, (void *)fp) != 0)
            break;
        *(u64 *)&e->data[dest + 8 + 8 * k] = frame[1];
        count++;
        if (frame[0] <= fp)
            break;
        fp = frame[0];
    }
    *(u64 *)&e->data[dest] = count;
}

SEC("uprobe")
int inject_probe(struct pt_regs *r) {
    u32 zero = 0;
    u32 idx = (u32)bpf_get_attach_cookie(r);
    struct plan *p = bpf_map_lookup_elem(&plans, &idx);
    struct config *c = bpf_map_lookup_elem(&config, &zero);
    struct event *e = bpf_map_lookup_elem(&scratch, &zero);
    if (!p || !c || !e || !c->enabled)
        return 0;
    u64 g = r->r14, sp = r->sp, bp = r->bp;
#ifdef INJECT_REJECTED
    // Tests only (tests/uprobe.rs): a read through a register's value, which the verifier
    // must refuse, to see how inject reports a rejection. Not in the shipped object.
    e->goid = *(u64 *)r->ax;
#endif
    e->site = p->site;
    e->kind = p->kind;
    e->cpu = bpf_get_smp_processor_id();
    e->goid = word_at(g + c->goid_off);
    e->sp = word_at(g + c->stack_hi_off) - sp;
    e->ints[0] = r->ax;
    e->ints[1] = r->bx;
    e->ints[2] = r->cx;
    e->ints[3] = r->di;
    e->ints[4] = r->si;
    e->ints[5] = r->r8;
    e->ints[6] = r->r9;
    e->ints[7] = r->r10;
    e->ints[8] = r->r11;
    u32 len = p->data_len;
    if (len > DATA_MAX)
        len = DATA_MAX;
    e->data_len = len;
    for (int i = 0; i < MAX_COPIES; i++) {
        if (i >= p->ncopies)
            break;
        struct copy *cp = &p->copies[i];
        copy_bytes(e, cp->dest, reg(e, sp, cp->ptr), (s64)reg(e, sp, cp->len), cp->max);
    }
    for (int i = 0; i < MAX_FIELDS; i++) {
        if (i >= p->nfields)
            break;
        field(e, sp, &p->fields[i]);
    }
    if (p->stack_n > 0)
        stack(e, sp, bp, g, c, p->stack_n, p->stack_dest);
    e->ktime = bpf_ktime_get_ns();
    if (bpf_ringbuf_output(&events, e, HEADER_LEN + len, 0) != 0) {
        u64 *d = bpf_map_lookup_elem(&drops, &idx);
        if (d)
            __sync_fetch_and_add(d, 1);
    }
    return 0;
}
