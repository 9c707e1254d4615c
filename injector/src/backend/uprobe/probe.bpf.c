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
// Trace context (the library probes: net/http, gRPC's HTTP/2, SQL, Redis) lives in two
// hash maps, by goroutine and by request, the BPF counterparts of the trampolines' context
// tables (ring_abi::ctx), with the same keys and states; the span ids made here are written
// into the record as the trampolines write them (ring_abi::span_ids). Writing a traceparent
// line into the target's bufio.Writer takes bpf_probe_write_user, which a kernel under
// lockdown refuses: those steps are programs of their own (inject_line, inject_undo), so
// that inject_probe loads everywhere and each is verified alone.
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
#define BPF_MAP_TYPE_LRU_HASH 9
#define BPF_MAP_TYPE_PERCPU_ARRAY 6
#define BPF_MAP_TYPE_RINGBUF 27

// x86-64 struct pt_regs, as the kernel hands it to a uprobe program.
struct pt_regs {
    u64 r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};

// Helper ids from linux/bpf.h (stable ABI).
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static u32 (*bpf_get_prandom_u32)(void) = (void *)7;
static long (*bpf_probe_write_user)(void *dst, const void *src, u32 len) = (void *)36;
static long (*bpf_trace_printk)(const char *fmt, u32 fmt_size, u64 arg) = (void *)6;

#ifdef INJECT_WRITES_CHECKED
// Tests only (tests/uprobe.rs): where the kernel refuses bpf_probe_write_user (lockdown),
// each write becomes a bpf_trace_printk of the same bytes, which the verifier checks the
// same way (readable memory of a bounded length) and which fails at run time: so the
// header-writing programs are verified, and nothing is written. Not in the shipped object.
#define WRITE_USER(dst, src, len) bpf_trace_printk((const char *)(src), (len), (u64)(dst))
#else
#define WRITE_USER(dst, src, len) bpf_probe_write_user((void *)(dst), (src), (len))
#endif
static u32 (*bpf_get_smp_processor_id)(void) = (void *)8;
static long (*bpf_probe_read_user)(void *dst, u32 size, const void *src) = (void *)112;
static long (*bpf_ringbuf_output)(void *ring, void *data, u64 size, u64 flags) = (void *)130;
static u64 (*bpf_ringbuf_query)(void *ring, u64 flags) = (void *)134;
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

#define GUARD_FIRST_BYTE 1
#define GUARD_IN_REQUESTS 2
#define GUARD_TAGGED 3
#define GUARD_OWN 4
#define GUARD_ZERO 5
// Record (and run the operations) only when this holds: trampolines::codegen::Guard.
struct guard {
    u8 kind, a, b, nfirst;
    u16 min_len, pad;
    u8 first[4];
    u32 bit;
};

// Trace-context operations (trampolines::codegen::Op), run before the field reads.
#define OP_STASH_LINE 1
#define OP_STASH_FIELD 2
#define OP_SERVER_BEGIN 3
#define OP_FORGET 4
#define OP_CLIENT_BEGIN 5
#define OP_CHILD_SPAN 6
#define OP_INHERIT 7
#define OP_INJECT_LINE 8
#define OP_UNDO_LINE 9
#define OP_PENDING_TO_REQUEST 10
#define OP_PENDING_FROM_REQUEST 11
#define OP_CLEAR_PENDING 12
#define OP_CLIENT_BEGIN_HERE 13
#define OP_CLIENT_END_HERE 14
#define OP_CLIENT_TO_REQUEST 15
#define OP_OUTGOING_FROM_REQUEST 16
#define OP_STAND_DOWN 17
#define OP_CONSUME_BEGIN 18
#define OP_CONSUME_END 19
#define MAX_OPS 3
// Registers a..d (ABI indices), a destination in the record, two offsets, a constant.
struct ctxop {
    u8 code, a, b, c;
    u16 dest;
    u8 d, flag;
    s32 off1, off2;
    u64 imm;
};

struct plan {
    u32 site;
    u8 kind, ncopies, nfields, stack_n;
    u16 stack_dest, data_len;
    // norecord: run the operations only (trampolines' `bare`).
    u8 nops, norecord, pad0, pad1;
    struct guard guard;
    struct ctxop ops[MAX_OPS];
    struct copy copies[MAX_COPIES];
    struct field fields[MAX_FIELDS];
};

// Offsets into runtime.g; enabled: records are written only while it is set, so that the
// uprobes go in and come out (one by one, each a kernel synchronisation) all at once.
// The sampler (trampolines::codegen::Sampling): root_below, parent_based.
struct config {
    u64 goid_off, stack_lo_off, stack_hi_off, enabled, root_below, parent_based;
};

// ring_abi::CtxState, ParentKind, span_ids, ctx tag bits.
#define PENDING 1
#define ACTIVE 2
#define PARENT_NONE 0
#define PARENT_REMOTE 1
#define PARENT_LOCAL 2
#define IDS_TRACE 0
#define IDS_SPAN 32
#define IDS_PARENT 48
#define IDS_PARENT_KIND 64
#define IDS_FLAGS 72
#define IDS_LEN 80
#define CLIENT_TAG (1ULL << 62)
#define OUT_TAG (1ULL << 61)
#define LINE_TAG (1ULL << 59)
#define ITAB_FUN0 24
// ring_abi::ctx::CONSUMER_MARK: a message's processing context holds its goid XOR this
// (aux[0]), so a copy another goroutine inherits is never taken for one.
#define CONSUMER_MARK 0x316b666b00000000ULL
// kafka.Header (a string and a byte slice), and how many of a message's are looked at.
#define KAFKA_HEADER_LEN 40
#define KAFKA_HEADERS_MAX 16
#define W3C_LINE 70
// Bytes of a writer's buffer the undo step looks through for the application's own line.
#define SCAN_MAX 4096
// Where in the record's data the undo step reads the writer's buffer into.
#define TAIL_AT 1024

// A context: a goroutine's (pending or active), a request's; for a LINE_TAG entry, the
// writer and where the line went (aux).
struct ctxval {
    u64 state;
    u8 trace[32];
    u8 span[16];
    u64 flags;
    u64 aux[3];
};

// Working space (the BPF stack is 512 bytes): a context being built, a line being read.
struct tmp {
    struct ctxval v;
    u8 buf[72];
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

// linux/bpf.h: ring buffer flags and queries.
#define BPF_RB_NO_WAKEUP 1
#define BPF_RB_FORCE_WAKEUP 2
#define BPF_RB_AVAIL_DATA 0
// A quarter of the ring buffer (events' size, set by inject: 16 MiB).
#define WAKE_AT (4 << 20)

struct map_def plans SEC("maps") = {BPF_MAP_TYPE_ARRAY, 4, sizeof(struct plan), 1, 0};
struct map_def config SEC("maps") = {BPF_MAP_TYPE_ARRAY, 4, sizeof(struct config), 1, 0};
struct map_def events SEC("maps") = {BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 24, 0};
// Records lost because the ring buffer was full, per plan (entry and return of each site).
struct map_def drops SEC("maps") = {BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0};
struct map_def scratch SEC("maps") = {BPF_MAP_TYPE_PERCPU_ARRAY, 4, sizeof(struct event), 1, 0};
// Least-recently-used hashes: a context whose end was never seen is evicted, never a leak.
struct map_def tmps SEC("maps") = {BPF_MAP_TYPE_PERCPU_ARRAY, 4, sizeof(struct tmp), 1, 0};
struct map_def goroutines SEC("maps") = {BPF_MAP_TYPE_LRU_HASH, 8, sizeof(struct ctxval), 1 << 14, 0};
struct map_def requests SEC("maps") = {BPF_MAP_TYPE_LRU_HASH, 8, sizeof(struct ctxval), 1 << 13, 0};

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

// ---- Trace context ----

INLINE u64 rnd(void) {
    u64 v = ((u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
    return v | 1;
}

// v as 16 lowercase hex digits.
INLINE void hex16(u8 *out, u64 v) {
    for (int i = 0; i < 16; i++) {
        u8 n = (v >> (60 - 4 * i)) & 15;
        out[i] = n < 10 ? '0' + n : 'a' + n - 10;
    }
}

// 16 lowercase hex digits' value (a trace id's low half).
INLINE u64 unhex16(const u8 *in) {
    u64 v = 0;
    for (int i = 0; i < 16; i++) {
        u8 c = in[i];
        v = (v << 4) | (c >= 'a' ? c - 'a' + 10 : c - '0');
    }
    return v;
}

// The flags the sampler gives a trace whose id's low 64 bits are low: "01" or "00".
INLINE u64 decide(struct config *c, u64 low) {
    u64 yes = '0' | ('1' << 8), no = '0' | ('0' << 8);
    if (c->root_below == ~0ULL)
        return yes;
    if (c->root_below == 0)
        return no;
    return (low >> 1) < c->root_below ? yes : no;
}

INLINE u8 *ids_at(struct event *e, u32 dest) {
    if (dest >= DATA_MAX)
        return 0;
    // Keeps clang from adding before it compares: the verifier bounds the pointer by the
    // register it checked.
    asm volatile("" : "+r"(dest));
    return &e->data[dest];
}

// A new span's ids at dest: a child of the goroutine's context when it is in `state` (its
// parent recorded as `kind`), else the root of a new trace. Fills `out` as the span's
// context (active).
INLINE int begin_span(struct event *e, struct config *c, u32 dest, u64 state, u64 kind, struct ctxval *out) {
    u8 *d = ids_at(e, dest);
    if (!d)
        return 0;
    u64 key = e->goid;
    struct ctxval *v = bpf_map_lookup_elem(&goroutines, &key);
    if (v && v->state == state) {
        __builtin_memcpy(d + IDS_TRACE, v->trace, 32);
        __builtin_memcpy(d + IDS_PARENT, v->span, 16);
        *(u64 *)(d + IDS_PARENT_KIND) = kind;
        if (state == ACTIVE || c->parent_based)
            *(u64 *)(d + IDS_FLAGS) = v->flags;
        else
            *(u64 *)(d + IDS_FLAGS) = decide(c, unhex16(&v->trace[16]));
    } else {
        hex16(d + IDS_TRACE, rnd());
        u64 low = rnd();
        *(u64 *)(d + IDS_FLAGS) = decide(c, low);
        hex16(d + IDS_TRACE + 16, low);
        *(u64 *)(d + IDS_PARENT) = 0;
        *(u64 *)(d + IDS_PARENT + 8) = 0;
        *(u64 *)(d + IDS_PARENT_KIND) = PARENT_NONE;
    }
    hex16(d + IDS_SPAN, rnd());
    out->state = ACTIVE;
    __builtin_memcpy(out->trace, d + IDS_TRACE, 32);
    __builtin_memcpy(out->span, d + IDS_SPAN, 16);
    out->flags = *(u64 *)(d + IDS_FLAGS);
    out->aux[0] = out->aux[1] = out->aux[2] = 0;
    return 1;
}

// A traceparent value (55 bytes read): when it is version 00 and well formed, the
// goroutine's pending context.
INLINE void stash_value(struct event *e, struct tmp *t, const u8 *v) {
    if (v[0] != '0' || v[1] != '0' || v[2] != '-' || v[35] != '-' || v[52] != '-')
        return;
    for (int i = 53; i < 55; i++) {
        u8 x = v[i];
        if (!((x >= '0' && x <= '9') || (x >= 'a' && x <= 'f')))
            return;
    }
    struct ctxval *nv = &t->v;
    nv->state = PENDING;
    __builtin_memcpy(nv->trace, v + 3, 32);
    __builtin_memcpy(nv->span, v + 36, 16);
    nv->flags = v[53] | ((u64)v[54] << 8);
    nv->aux[0] = nv->aux[1] = nv->aux[2] = 0;
    u64 key = e->goid;
    bpf_map_update_elem(&goroutines, &key, nv, 0);
}

// `Traceparent: <value>` (the name in any case, one optional space), an HTTP/1 line.
INLINE void stash_line(struct event *e, struct tmp *t, u64 ptr, s64 len) {
    u8 *line = t->buf;
    if (!ptr || len < 67)
        return;
    if (bpf_probe_read_user(line, len >= 68 ? 68 : 67, (void *)ptr) != 0)
        return;
    const char *name = "traceparent";
    for (int i = 0; i < 11; i++)
        if ((line[i] | 0x20) != name[i])
            return;
    if (line[11] != ':')
        return;
    if (line[12] == ' ') {
        if (len >= 68)
            stash_value(e, t, &line[13]);
    } else {
        stash_value(e, t, &line[12]);
    }
}

// Whether the (pointer, length) string is exactly `traceparent` (an HTTP/2 field name).
INLINE int is_traceparent(u64 ptr, s64 len) {
    u8 name[11];
    if (len != 11 || !ptr || bpf_probe_read_user(name, 11, (void *)ptr) != 0)
        return 0;
    const char *want = "traceparent";
    for (int i = 0; i < 11; i++)
        if (name[i] != want[i])
            return 0;
    return 1;
}

// A (name, value) pair of strings, an HTTP/2 field or a Kafka header: when the name is
// `traceparent`, its value (if a well-formed one) becomes the goroutine's pending context.
// Whether the name matched.
INLINE int stash_pair(struct event *e, struct tmp *t, u64 name, s64 name_len, u64 value, s64 value_len) {
    if (!is_traceparent(name, name_len))
        return 0;
    if (value_len >= 55 && value && bpf_probe_read_user(t->buf, 55, (void *)value) == 0)
        stash_value(e, t, t->buf);
    return 1;
}

// Moves the entry under `key` in `from` (in `state`, when state is not 0) to `to_key` in `to`.
INLINE void move_entry(struct tmp *t, void *from, u64 key, u64 state, void *to, u64 to_key) {
    struct ctxval *v = bpf_map_lookup_elem(from, &key);
    if (!v || (state && v->state != state) || !to_key)
        return;
    t->v = *v;
    bpf_map_update_elem(to, &to_key, &t->v, 0);
    bpf_map_delete_elem(from, &key);
}

INLINE void forget(void *map, u64 key) {
    bpf_map_delete_elem(map, &key);
}

// One operation of the plan (the light ones: the header writes are programs of their own).
INLINE void ctx_op(struct event *e, struct config *c, struct tmp *t, u64 sp, struct ctxop *o) {
    struct ctxval *nv = &t->v;
    u64 goid = e->goid;
    switch (o->code) {
    case OP_STASH_LINE:
        stash_line(e, t, reg(e, sp, o->a), (s64)reg(e, sp, o->b));
        break;
    case OP_STASH_FIELD:
        stash_pair(e, t, reg(e, sp, o->a), (s64)reg(e, sp, o->b), reg(e, sp, o->c), (s64)reg(e, sp, o->d));
        break;
    case OP_SERVER_BEGIN:
        if (begin_span(e, c, o->dest, PENDING, PARENT_REMOTE, nv))
            bpf_map_update_elem(&goroutines, &goid, nv, 0);
        break;
    case OP_FORGET:
        forget(&goroutines, goid);
        break;
    case OP_CLIENT_BEGIN: {
        if (!begin_span(e, c, o->dest, ACTIVE, PARENT_LOCAL, nv))
            break;
        u64 req = reg(e, sp, o->a);
        if (!req)
            break;
        u64 map = word_at(req + o->off1);
        if (map)
            bpf_map_update_elem(&requests, &map, nv, 0);
        break;
    }
    case OP_CHILD_SPAN:
        begin_span(e, c, o->dest, ACTIVE, PARENT_LOCAL, nv);
        break;
    case OP_INHERIT: {
        // A new g inherits its creator's active span, or its incoming context not yet
        // started (HTTP/2 starts each handler on a goroutine of its own).
        u64 newg = reg(e, sp, o->a);
        if (!newg)
            break;
        u64 parent = word_at(newg + o->off2);
        struct ctxval *v = bpf_map_lookup_elem(&goroutines, &parent);
        if (!v || (v->state != ACTIVE && v->state != PENDING))
            break;
        *nv = *v;
        u64 child = word_at(newg + o->off1);
        if (child)
            bpf_map_update_elem(&goroutines, &child, nv, 0);
        break;
    }
    case OP_PENDING_TO_REQUEST:
        move_entry(t, &goroutines, goid, PENDING, &requests, reg(e, sp, o->a));
        break;
    case OP_PENDING_FROM_REQUEST: {
        u64 key = reg(e, sp, o->a);
        if (key)
            move_entry(t, &requests, key, PENDING, &goroutines, goid);
        break;
    }
    case OP_CLEAR_PENDING: {
        struct ctxval *v = bpf_map_lookup_elem(&goroutines, &goid);
        if (v && v->state == PENDING)
            forget(&goroutines, goid);
        break;
    }
    case OP_CLIENT_BEGIN_HERE:
        if (begin_span(e, c, o->dest, ACTIVE, PARENT_LOCAL, nv)) {
            u64 key = goid | CLIENT_TAG;
            bpf_map_update_elem(&goroutines, &key, nv, 0);
        }
        break;
    case OP_CLIENT_END_HERE:
        forget(&goroutines, goid | CLIENT_TAG);
        break;
    case OP_CLIENT_TO_REQUEST:
        move_entry(t, &goroutines, goid | CLIENT_TAG, ACTIVE, &requests, reg(e, sp, o->a));
        break;
    case OP_OUTGOING_FROM_REQUEST: {
        // A span left over (its headers never written) must not name the next.
        forget(&goroutines, goid | OUT_TAG);
        u64 key = reg(e, sp, o->a);
        if (key && o->flag)
            key = word_at(key + o->off1);
        if (key)
            move_entry(t, &requests, key, ACTIVE, &goroutines, goid | OUT_TAG);
        break;
    }
    case OP_CONSUME_BEGIN: {
        // Inside a span the goroutine serves: the processing is its child, and the
        // goroutine's context stays the span's.
        struct ctxval *v = bpf_map_lookup_elem(&goroutines, &goid);
        if (v && v->state == ACTIVE && v->aux[0] != (goid ^ CONSUMER_MARK)) {
            begin_span(e, c, o->dest, ACTIVE, PARENT_LOCAL, nv);
            break;
        }
        // Else a context of its own, continuing the message's traceparent; a pending
        // context left over from anything else is not the message's.
        if (v && v->state == PENDING)
            forget(&goroutines, goid);
        u64 hs[2] = {0, 0};
        if (bpf_probe_read_user(hs, 16, (void *)(sp + o->off1)) == 0 && hs[0] && (s64)hs[1] > 0) {
            for (u32 k = 0; k < KAFKA_HEADERS_MAX; k++) {
                if (k >= hs[1])
                    break;
                u64 h[4] = {0, 0, 0, 0};
                if (bpf_probe_read_user(h, 32, (void *)(hs[0] + KAFKA_HEADER_LEN * k)) != 0)
                    break;
                if (stash_pair(e, t, h[0], (s64)h[1], h[2], (s64)h[3]))
                    break;
            }
        }
        if (begin_span(e, c, o->dest, PENDING, PARENT_REMOTE, nv)) {
            nv->aux[0] = goid ^ CONSUMER_MARK;
            bpf_map_update_elem(&goroutines, &goid, nv, 0);
        }
        break;
    }
    case OP_CONSUME_END: {
        // The goroutine fetches again: the context its last message gave it ends.
        struct ctxval *v = bpf_map_lookup_elem(&goroutines, &goid);
        if (v && v->aux[0] == (goid ^ CONSUMER_MARK))
            forget(&goroutines, goid);
        break;
    }
    case OP_INJECT_LINE:
    case OP_UNDO_LINE:
        // Their own programs did not load (the kernel refuses writes to user memory):
        // the record says nothing was written.
        put_word(e, o->dest, 0);
        break;
    case OP_STAND_DOWN: {
        put_word(e, o->dest, 0);
        if (!is_traceparent(reg(e, sp, o->a), (s64)reg(e, sp, o->b)))
            break;
        u64 key = goid | OUT_TAG;
        if (bpf_map_lookup_elem(&goroutines, &key)) {
            forget(&goroutines, key);
            put_word(e, o->dest, 1);
        }
        break;
    }
    }
}

INLINE int guard_holds(struct event *e, u64 sp, struct guard *gd) {
    switch (gd->kind) {
    case GUARD_FIRST_BYTE: {
        s64 len = (s64)reg(e, sp, gd->b);
        u64 ptr = reg(e, sp, gd->a);
        u8 b = 0;
        if (len < (gd->min_len ? gd->min_len : 1) || !ptr || bpf_probe_read_user(&b, 1, (void *)ptr) != 0)
            return 0;
        b |= 0x20;
        for (int i = 0; i < 4; i++)
            if (i < gd->nfirst && b == gd->first[i])
                return 1;
        return 0;
    }
    case GUARD_IN_REQUESTS: {
        u64 key = reg(e, sp, gd->a);
        return key && bpf_map_lookup_elem(&requests, &key) != 0;
    }
    case GUARD_TAGGED: {
        u64 key = e->goid | (1ULL << (gd->bit & 63));
        return bpf_map_lookup_elem(&goroutines, &key) != 0;
    }
    case GUARD_OWN: {
        u64 key = e->goid;
        return bpf_map_lookup_elem(&goroutines, &key) != 0;
    }
    case GUARD_ZERO:
        return reg(e, sp, gd->a) == 0;
    }
    return 1;
}

// ---- The programs ----

// The attach point's plan, the configuration and a filled record header, or 0 when
// nothing is to be recorded (not enabled, or the guard does not hold).
INLINE struct event *begin(struct pt_regs *r, struct plan **pp, struct config **cp, u32 *idxp) {
    u32 zero = 0;
    u32 idx = (u32)bpf_get_attach_cookie(r);
    struct plan *p = bpf_map_lookup_elem(&plans, &idx);
    struct config *c = bpf_map_lookup_elem(&config, &zero);
    struct event *e = bpf_map_lookup_elem(&scratch, &zero);
    if (!p || !c || !e || !c->enabled)
        return 0;
    u64 g = r->r14, sp = r->sp;
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
    if (p->guard.kind && !guard_holds(e, sp, &p->guard))
        return 0;
    u32 len = p->data_len;
    if (len > DATA_MAX)
        len = DATA_MAX;
    e->data_len = len;
    *pp = p;
    *cp = c;
    *idxp = idx;
    return e;
}

INLINE void finish(struct event *e, struct plan *p, u32 idx) {
    if (p->norecord)
        return;
    e->ktime = bpf_ktime_get_ns();
    u32 len = e->data_len;
    if (len > DATA_MAX)
        len = DATA_MAX;
    // The pump is woken only once the buffer is a quarter full; else it looks every few
    // milliseconds. A wakeup per record cost each probed call an irq_work and the pump a
    // context switch (docs/uprobe.md: the hit's cost).
    u64 wake = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > WAKE_AT ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
    if (bpf_ringbuf_output(&events, e, HEADER_LEN + len, wake) != 0) {
        u64 *d = bpf_map_lookup_elem(&drops, &idx);
        if (d)
            __sync_fetch_and_add(d, 1);
    }
}

// About to write a request's header map (o: map a, writer itab b and data c, the
// bufio.(*Writer).Write entry imm, the writer's buf off1 and n off2): when the map has a
// client span and the writer is a *bufio.Writer with room, a traceparent line goes into its
// buffer before the request's own lines. The record's data: 1 and the span id when it did,
// else 0; the goroutine keeps where the line went (LINE_TAG) for undo_line. 0: no record.
INLINE int inject_line_op(struct event *e, u64 sp, struct ctxop *o) {
    u32 dest = o->dest;
    if (dest > DATA_MAX - 32)
        return 0;
    put_word(e, dest, 0);
    put_word(e, dest + 24, 0);
    u64 map = reg(e, sp, o->a), itab = reg(e, sp, o->b), w = reg(e, sp, o->c);
    struct ctxval *v = map ? bpf_map_lookup_elem(&requests, &map) : 0;
    if (!v || v->state != ACTIVE || !itab || !w || word_at(itab + ITAB_FUN0) != o->imm)
        return 1;
    struct ctxval cv = *v;
    s64 n = (s64)word_at(w + o->off2);
    u64 cap = word_at(w + o->off1 + 8), buf = word_at(w + o->off1);
    if (n < 0 || (u64)n + W3C_LINE > cap || !buf)
        return 1;
    u8 line[W3C_LINE];
    __builtin_memcpy(line, "traceparent: 00-", 16);
    __builtin_memcpy(line + 16, cv.trace, 32);
    line[48] = '-';
    __builtin_memcpy(line + 49, cv.span, 16);
    line[65] = '-';
    u64 flags = cv.flags & 0xffff;
    line[66] = flags ? (u8)flags : '0';
    line[67] = flags ? (u8)(flags >> 8) : '1';
    line[68] = '\r';
    line[69] = '\n';
    if (WRITE_USER(buf + n, line, W3C_LINE) != 0)
        return 1;
    u64 filled = (u64)n + W3C_LINE;
    WRITE_USER(w + o->off2, &filled, 8);
    // One request, one line: a later request with the same map gets its own.
    bpf_map_delete_elem(&requests, &map);
    put_word(e, dest, 1);
    __builtin_memcpy(&e->data[(dest & (DATA_MAX - 1)) + 8], cv.span, 16);
    struct ctxval at = {};
    at.aux[0] = w;
    at.aux[1] = (u64)n;
    at.aux[2] = W3C_LINE;
    u64 key = e->goid | LINE_TAG;
    bpf_map_update_elem(&goroutines, &key, &at, 0);
    return 1;
}

// At the return of the function inject_line_op wrote a line in (o: buf off1, n off2): when
// a later header line names a traceparent (the application's own), ours comes back out:
// the bytes after it move down over it and the fill index goes back. The record's data: 1
// and the bytes taken out, 2 when the buffer was flushed meanwhile, else 0.
INLINE int undo_line_op(struct event *e, struct ctxop *o) {
    u32 dest = o->dest;
    // The record's own data is the 16 bytes at dest; the writer's buffer is read into the
    // spare bytes from TAIL_AT.
    if (dest > TAIL_AT - 16)
        return 0;
    put_word(e, dest, 0);
    u64 key = e->goid | LINE_TAG;
    struct ctxval *v = bpf_map_lookup_elem(&goroutines, &key);
    if (!v)
        return 1;
    u64 w = v->aux[0], start = v->aux[1], len = v->aux[2];
    bpf_map_delete_elem(&goroutines, &key);
    u64 n = word_at(w + o->off2), buf = word_at(w + o->off1), cap = word_at(w + o->off1 + 8);
    if (!w || !buf || len != W3C_LINE)
        return 1;
    u8 head[16];
    // A flush moved the fill index back, or the line is no longer there.
    if (n > cap || n < start + len || bpf_probe_read_user(head, 16, (void *)(buf + start)) != 0 ||
        __builtin_memcmp(head, "traceparent: 00-", 16) != 0) {
        put_word(e, dest, 2);
        return 1;
    }
    // The bytes from the '\n' ending our line to the fill index. Lines beyond the look are
    // not looked through, so nothing is moved (the transport's buffer is 4096 bytes: a
    // header block it holds always fits).
    u64 from = start + len - 1;
    u64 avail = n - from;
    u8 *tail = &e->data[TAIL_AT];
    if (avail > SCAN_MAX - 1 || avail < 14 ||
        bpf_probe_read_user(tail, avail & (SCAN_MAX - 1), (void *)(buf + from)) != 0)
        return 1;
    // Branch-free at each byte but one exit test: the verifier keeps a pending state for
    // every branch a loop takes (at most 8192), so each position costs it one.
    u32 own = 0;
    for (u32 i = 0; i < SCAN_MAX - 16; i++) {
        u64 over = (avail - 13 - i) >> 63;
        u64 w8 = *(u64 *)&tail[i + 1] | 0x2020202020202020ULL;
        u64 w4 = *(u32 *)&tail[i + 8] | 0x20202020;
        u64 x = (u64)(tail[i] ^ '\n') | (u64)(tail[i + 12] ^ ':') | (w8 ^ 0x7261706563617274ULL) |
                (w4 ^ 0x746e6572);
        x = (x | (x >> 32)) & 0xffffffffULL;
        u64 hit = (x - 1) >> 63;
        if (over | hit) {
            own = (u32)((1 - over) * hit * (i + 1));
            break;
        }
    }
    if (!own)
        return 1;
    // buf[start+len:n] moves to buf[start:] (what follows our '\n'), n -= len.
    u32 rest = (u32)(avail - 1) & (SCAN_MAX - 1);
    if (rest == 0 || WRITE_USER(buf + start, tail + 1, rest) != 0)
        return 1;
    u64 filled = n - len;
    WRITE_USER(w + o->off2, &filled, 8);
    put_word(e, dest, 1);
    put_word(e, dest + 8, len);
    return 1;
}

// What every program does: the plan, the record's header, the guard; then its work (`which`,
// a constant, so each program keeps its own); then the record out.
INLINE int run(struct pt_regs *r, int which) {
    struct plan *p = 0;
    struct config *c = 0;
    u32 idx = 0;
    struct event *e = begin(r, &p, &c, &idx);
    if (!e || !p || !c)
        return 0;
    u64 g = r->r14, sp = r->sp, bp = r->bp;
    if (which == OP_INJECT_LINE) {
        if (!inject_line_op(e, sp, &p->ops[0]))
            return 0;
    } else if (which == OP_UNDO_LINE) {
        if (!undo_line_op(e, &p->ops[0]))
            return 0;
    } else {
        u32 zero = 0;
        struct tmp *t = bpf_map_lookup_elem(&tmps, &zero);
        if (!t)
            return 0;
        for (int i = 0; i < MAX_OPS; i++) {
            if (i >= p->nops)
                break;
            ctx_op(e, c, t, sp, &p->ops[i]);
        }
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
    }
    finish(e, p, idx);
    return 0;
}

SEC("uprobe")
int inject_probe(struct pt_regs *r) {
    return run(r, 0);
}

// The header writes (bpf_probe_write_user): programs of their own.
SEC("uprobe")
int inject_line(struct pt_regs *r) {
    return run(r, OP_INJECT_LINE);
}

SEC("uprobe")
int inject_undo(struct pt_regs *r) {
    return run(r, OP_UNDO_LINE);
}
