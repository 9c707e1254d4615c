//! Live statistics (`inject --stats`): per function call, error and latency counters that
//! the trampolines update themselves, so that the numbers are exact at any call rate and
//! need no record per call.
//!
//! The region (before the journal) holds, in order:
//! - the frame table: where an entry trampoline leaves the time stamp counter for the
//!   return to subtract. Entries are keyed by the goroutine (its `g` pointer) and the
//!   frame (`g.stack.hi - SP`, which survives the runtime copying the stack, and the site),
//!   in sets of [`WAYS`] picked by a hash of both: recursion and nested probed calls each
//!   get their own entry. A return takes its entry back (key 0); an entry no return took
//!   (a panic unwound through the call) is overwritten by a later call of the same frame,
//!   or evicted. Keyed by `g`, not the goid: `g` is R14, no load, and a recycled `g`'s
//!   stale entries are overwritten by the new goroutine's own entries before any of its
//!   returns could read them.
//! - per site, a missed-call counter (`lock inc`): calls made on a thread whose P has no
//!   block (no P, or a P id beyond [`crate::Layout::stats_slots`], after the program
//!   raised GOMAXPROCS): counted, never silently lost.
//! - per site and P, a [`BLOCK`] of counters, written with plain (non-atomic) instructions
//!   by the one thread that holds that P: Go's scheduler never takes a running P from its
//!   thread (only one in a system call), and never preempts a thread whose PC is outside Go
//!   code (`isAsyncSafePoint`: `findfunc(pc)` is invalid for a trampoline), so no other
//!   thread touches the block while a trampoline runs. The reader sums the blocks.

/// Sets of the frame table, a power of two.
pub const FRAME_SETS: usize = 1 << 14;
pub const WAYS: usize = 4;
/// A frame entry: the `g` (0: free), the frame, the time stamp counter at entry.
pub const FRAME_ENTRY: usize = 32;
pub const FRAME_G: usize = 0;
/// `g.stack.hi - SP` at the entry (low [`FRAME_SITE_SHIFT`] bits), the site above.
pub const FRAME_KEY: usize = 8;
pub const FRAME_TSC: usize = 16;
pub const FRAME_SITE_SHIFT: u32 = 40;
pub const FRAMES_LEN: usize = FRAME_SETS * WAYS * FRAME_ENTRY;

/// In a block (first cache line): calls (at entry), calls that returned an `error` other
/// than nil, the sum and the largest of the latencies (time stamp counter ticks), returns
/// that found no entry time (not sampled, begun before the probes went in, or evicted),
/// and the sampling state.
pub const CALLS: usize = 0;
pub const ERRORS: usize = 8;
pub const SUM: usize = 16;
pub const MAX: usize = 24;
pub const UNTIMED: usize = 32;
/// Calls until the next timed one: an entry decrements it and times the call when it goes
/// below zero.
pub const SKIP: usize = 40;
/// Calls skipped between two timed ones (0: every call is timed; then 1, 3, 7...: one in
/// a power of two). Reading the time stamp counter costs ~10 ns on these machines (two per
/// timed call), so each timed entry adapts it: doubled (plus one) when the P's previous
/// timed call of the function was less than [`MIN_GAP`] ago, halved when more than 8 times
/// that. Calls and errors stay exact; the histogram becomes a systematic sample.
pub const PERIOD: usize = 48;
/// The time stamp counter at the P's last timed call.
pub const LAST: usize = 56;
/// Three words where the trampoline parks registers (second cache line).
pub const SPILL: usize = 64;
/// Ticks below which timed calls come too often (written by the reader; 0: time every
/// call, as the period then only shrinks).
pub const MIN_GAP: usize = 88;
/// The largest [`PERIOD`]: one call in 65536 timed.
pub const MAX_PERIOD: u64 = (1 << 16) - 1;
/// The latency histogram (u64 counters), after the second line.
pub const HIST: usize = 128;
/// Sub-buckets per power of two (2^[`SUB_BITS`]): a bucket is at most 1/8 of its values
/// wide, so a percentile read from it is within 6% of the true one.
pub const SUB_BITS: u32 = 3;
/// Latencies of 2^([`MAX_EXP`] + 1) ticks and more (hours) share the last bucket.
pub const MAX_EXP: u32 = 45;
/// Exact ones below 2^SUB_BITS, 2^SUB_BITS per power of two up to 2^(MAX_EXP+1), then
/// the last (for longer ones).
pub const BUCKETS: usize = ((MAX_EXP - SUB_BITS) as usize + 2) * (1 << SUB_BITS) + 1;
pub const BLOCK: usize = (HIST + BUCKETS * 8).next_multiple_of(64);

/// The bucket of a latency of `ticks`: exact below 2^[`SUB_BITS`], then 2^[`SUB_BITS`]
/// buckets per power of two (what the trampoline computes with `BSR`).
pub fn bucket(ticks: u64) -> usize {
    let sub = 1u64 << SUB_BITS;
    if ticks < sub {
        return ticks as usize;
    }
    let e = 63 - ticks.leading_zeros();
    if e > MAX_EXP {
        return BUCKETS - 1;
    }
    let shift = e - SUB_BITS;
    (shift as usize) * sub as usize + (ticks >> shift) as usize
}

/// The smallest and one past the largest latency (ticks) of bucket `b`.
pub fn bucket_range(b: usize) -> (u64, u64) {
    let sub = 1usize << SUB_BITS;
    if b < sub {
        return (b as u64, b as u64 + 1);
    }
    if b >= BUCKETS - 1 {
        return (1 << (MAX_EXP + 1), u64::MAX);
    }
    let shift = (b / sub - 1) as u32;
    let lo = ((b % sub + sub) as u64) << shift;
    (lo, lo + (1 << shift))
}

/// Bytes of the region for `sites` sites and `slots` P blocks each.
pub fn len(sites: usize, slots: usize) -> usize {
    FRAMES_LEN + missed_len(sites) + sites * slots * BLOCK
}

/// Bytes of the missed-call counters (a page multiple).
pub fn missed_len(sites: usize) -> usize {
    (sites * 8).next_multiple_of(crate::PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_latency_in_order() {
        assert_eq!(BUCKETS, 353);
        let mut last = 0;
        for t in (0..5000u64).chain([1 << 20, (1 << 20) + 1, 1 << 45, (1 << 46) - 1, 1 << 46, u64::MAX]) {
            let b = bucket(t);
            assert!(b < BUCKETS, "{t}");
            let (lo, hi) = bucket_range(b);
            // The last bucket also holds u64::MAX itself.
            assert!(lo <= t && (t < hi || b == BUCKETS - 1), "{t} in bucket {b} = {lo}..{hi}");
            if t < 5000 {
                assert!(b >= last);
                last = b;
            }
        }
        // Contiguous ranges.
        for b in 1..BUCKETS {
            assert_eq!(bucket_range(b - 1).1, bucket_range(b).0, "{b}");
        }
        assert_eq!(bucket((1 << 46) - 1), BUCKETS - 2);
        assert_eq!(bucket(1 << 46), BUCKETS - 1);
    }
}
