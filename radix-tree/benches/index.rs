//! Criterion benchmarks of the index's hot paths, plus a memory figure.
//!
//! - `match_prefix/{1k,8k,32k}`: lookup of a fully cached prompt through
//!   `match_prefix_into` with a reused `Match` (the hit path must not
//!   allocate). Target: 8k in at most 10 µs.
//! - `insert/{1k,8k,32k}`: insert of a prompt that shares nothing with the
//!   index. Target: 8k in at most 50 µs.
//! - `insert_half_cached/{1k,8k,32k}`: insert of a prompt whose first half is
//!   the head of a cached edge (the insert splits it, then appends the rest).
//! - Before criterion runs, the binary prints the index's memory per cached
//!   page (page size 16, tokens included), measured with a counting global
//!   allocator. Target: at most 128 bytes per page.
//!
//! Run: `cargo bench -p radix-tree --bench index`.

use criterion::{BenchmarkId, Criterion, Throughput};
use radix_tree::{
    BlockId, IndexConfig, Match, NamespaceConfig, NamespaceId, NamespaceKey, RadixIndex, Tier,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ---- counting allocator ------------------------------------------------------

/// Live heap bytes (as requested by callers, not counting malloc's own
/// headers or rounding).
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Allocation calls (alloc, alloc_zeroed and realloc) since start.
static ALLOC_CALLS: AtomicUsize = AtomicUsize::new(0);

/// `System`, with a count of live bytes and of allocation calls.
struct CountingAlloc;

// SAFETY: every method forwards its arguments unchanged to `System`, which
// implements `GlobalAlloc` soundly, and returns `System`'s result unchanged;
// the counters are plain atomics that never touch the allocated memory, and
// nothing here allocates, so the wrapper upholds exactly `System`'s contract.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: our caller guarantees `layout` satisfies `alloc`'s contract
        // (non-zero size); we pass it to `System.alloc` unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOC_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`: the caller's valid layout goes to
        // `System.alloc_zeroed` unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOC_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller guarantees `ptr` was allocated by this allocator
        // with `layout`; every such block came from `System` with that same
        // layout (or the size `realloc` last gave it), so `System` may free it.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `ptr` is a live block of this
        // allocator with `layout` (so a `System` block with that layout) and
        // that `new_size` is valid for `layout`'s alignment; all of it is
        // passed to `System.realloc` unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            ALLOC_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn alloc_calls() -> usize {
    ALLOC_CALLS.load(Ordering::Relaxed)
}

// ---- workload ----------------------------------------------------------------

const PAGE: usize = 16;
const VOCAB: u64 = 50_000;
/// Tokens a conversation turn adds to the measured lookup prompt.
const TURN: usize = 1024;
/// Other conversations sharing the system prompt in the lookup fixture.
const CONVERSATIONS: usize = 64;
const SIZES: [usize; 3] = [1 << 10, 8 << 10, 32 << 10];

fn label(len: usize) -> String {
    format!("{}k", len >> 10)
}

/// splitmix64: a small seeded PRNG, so runs see the same prompts.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u32]) {
        for t in out {
            *t = (self.next_u64() % VOCAB) as u32;
        }
    }

    fn tokens(&mut self, n: usize) -> Vec<u32> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}

/// Hands out distinct block ids into a reused buffer.
#[derive(Default)]
struct Blocks {
    next: u32,
    buf: Vec<BlockId>,
}

impl Blocks {
    fn with_capacity(pages: usize) -> Self {
        Blocks {
            next: 0,
            buf: Vec::with_capacity(pages),
        }
    }

    /// One fresh block id per whole page of a `tokens`-long prompt.
    fn for_tokens(&mut self, tokens: usize) -> &[BlockId] {
        self.buf.clear();
        for _ in 0..tokens / PAGE {
            self.buf.push(BlockId(self.next));
            // u32::MAX is reserved; wrap well before it.
            self.next = (self.next + 1) % (1 << 31);
        }
        &self.buf
    }
}

fn new_index() -> (RadixIndex, NamespaceId) {
    let index = RadixIndex::new(IndexConfig::default());
    let key = NamespaceKey::new("bench", "model", "layout", "");
    let ns = index
        .create_namespace(&key, NamespaceConfig::new(PAGE).expect("page size"))
        .expect("namespace");
    (index, ns)
}

fn insert(index: &RadixIndex, ns: NamespaceId, tokens: &[u32], blocks: &mut Blocks) {
    index
        .insert(ns, tokens, Tier::Device, blocks.for_tokens(tokens.len()))
        .expect("insert");
}

/// An index holding `CONVERSATIONS` prompts of `len` tokens that share a
/// system prompt, and the measured prompt (same system prompt, own tail),
/// cached turn by turn as a server sees a conversation grow.
struct MatchFixture {
    index: RadixIndex,
    ns: NamespaceId,
    prompt: Vec<u32>,
}

fn match_fixture(len: usize) -> MatchFixture {
    let mut rng = Rng::new(0x6d61_7463_6800 ^ len as u64);
    let mut blocks = Blocks::default();
    let (index, ns) = new_index();
    let sys_len = (len / 2).min(2048);
    let system = rng.tokens(sys_len);
    let mut other = system.clone();
    other.resize(len, 0);
    for _ in 0..CONVERSATIONS {
        rng.fill(&mut other[sys_len..]);
        insert(&index, ns, &other, &mut blocks);
    }
    let mut prompt = system;
    prompt.resize(len, 0);
    rng.fill(&mut prompt[sys_len..]);
    let turn = TURN.min(len - sys_len);
    let mut end = sys_len;
    while end < len {
        end = (end + turn).min(len);
        insert(&index, ns, &prompt[..end], &mut blocks);
    }
    let m = index.match_prefix(ns, &prompt).expect("match");
    assert_eq!(
        m.pages,
        len / PAGE,
        "fixture: the measured prompt is fully cached"
    );
    MatchFixture { index, ns, prompt }
}

/// A long-lived index for insert benchmarks: a system prompt shared by
/// `CONVERSATIONS` cached conversations, to which each iteration adds new
/// prompts. Rebuilt (outside the timing) before it grows large, so the
/// root's fan-out and the memory in use stay bounded.
struct InsertBed {
    rng: Rng,
    blocks: Blocks,
    index: RadixIndex,
    ns: NamespaceId,
    inserts: usize,
    pages: usize,
}

impl InsertBed {
    const MAX_INSERTS: usize = 256;
    const MAX_PAGES: usize = 1 << 18;

    fn new(seed: u64) -> Self {
        let mut bed = InsertBed {
            rng: Rng::new(seed),
            blocks: Blocks::with_capacity(SIZES[2] / PAGE),
            index: RadixIndex::default(),
            ns: NamespaceId(0),
            inserts: 0,
            pages: 0,
        };
        bed.rebuild();
        bed
    }

    fn rebuild(&mut self) {
        let (index, ns) = new_index();
        let mut prompt = self.rng.tokens(2048);
        prompt.resize(4096, 0);
        for _ in 0..CONVERSATIONS {
            self.rng.fill(&mut prompt[2048..]);
            insert(&index, ns, &prompt, &mut self.blocks);
        }
        self.index = index;
        self.ns = ns;
        self.inserts = 0;
        self.pages = 0;
    }

    /// Rebuilds if the next `pages` would take the index past its bounds.
    fn make_room(&mut self, pages: usize) {
        if self.inserts >= Self::MAX_INSERTS || self.pages + pages > Self::MAX_PAGES {
            self.rebuild();
        }
        self.inserts += 1;
        self.pages += pages;
    }

    /// Inserts `tokens` and returns how long the insert alone took.
    fn timed_insert(&mut self, tokens: &[u32]) -> Duration {
        let blocks = self.blocks.for_tokens(tokens.len());
        let start = Instant::now();
        let out = self
            .index
            .insert(self.ns, black_box(tokens), Tier::Device, blocks);
        let elapsed = start.elapsed();
        black_box(out.expect("insert"));
        elapsed
    }
}

// ---- benchmarks --------------------------------------------------------------

fn bench_match_prefix(c: &mut Criterion) {
    let mut g = c.benchmark_group("match_prefix");
    for len in SIZES {
        let fx = match_fixture(len);
        let mut out = Match::default();
        g.throughput(Throughput::Elements(len as u64));
        g.bench_function(BenchmarkId::from_parameter(label(len)), |b| {
            b.iter(|| {
                fx.index
                    .match_prefix_into(fx.ns, black_box(&fx.prompt), &mut out)
                    .expect("match");
                black_box(&out);
            })
        });
    }
    g.finish();
}

fn bench_insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("insert");
    for len in SIZES {
        let mut bed = InsertBed::new(0x696e_7365_7274 ^ len as u64);
        let mut prompt = vec![0u32; len];
        g.throughput(Throughput::Elements(len as u64));
        g.bench_function(BenchmarkId::from_parameter(label(len)), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    bed.make_room(len / PAGE);
                    bed.rng.fill(&mut prompt);
                    total += bed.timed_insert(&prompt);
                }
                total
            })
        });
    }
    g.finish();
}

fn bench_insert_half_cached(c: &mut Criterion) {
    let mut g = c.benchmark_group("insert_half_cached");
    for len in SIZES {
        let mut bed = InsertBed::new(0x0073_706c_6974 ^ len as u64);
        let mut cached = vec![0u32; len];
        let mut prompt = vec![0u32; len];
        g.throughput(Throughput::Elements(len as u64));
        g.bench_function(BenchmarkId::from_parameter(label(len)), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    bed.make_room(len / PAGE + len / 2 / PAGE);
                    // Cache a `len`-token edge, then insert a prompt that
                    // follows it for half its length: a split, then a new leaf.
                    bed.rng.fill(&mut cached);
                    insert(&bed.index, bed.ns, &cached, &mut bed.blocks);
                    prompt[..len / 2].copy_from_slice(&cached[..len / 2]);
                    bed.rng.fill(&mut prompt[len / 2..]);
                    total += bed.timed_insert(&prompt);
                }
                total
            })
        });
    }
    g.finish();
}

// ---- memory --------------------------------------------------------------------

/// Inserts `count` prompts of `len` tokens, the first `shared` of which are a
/// system prompt common to all, into a fresh index; prints the live heap
/// bytes the index added per cached page.
fn memory_per_page(name: &str, count: usize, len: usize, shared: usize) {
    let mut rng = Rng::new(0x006d_656d ^ (count * len) as u64);
    let mut prompt = vec![0u32; len];
    rng.fill(&mut prompt[..shared]);
    let mut blocks = Blocks::with_capacity(len / PAGE);
    let before = live_bytes();
    let (index, ns) = new_index();
    for _ in 0..count {
        rng.fill(&mut prompt[shared..]);
        insert(&index, ns, &prompt, &mut blocks);
    }
    let used = live_bytes() - before;
    let stats = index.stats();
    println!(
        "memory/{name}: {:.1} bytes/page measured ({used} bytes, {} pages, {} nodes); \
         index reports {:.1} bytes/page",
        used as f64 / stats.pages as f64,
        stats.pages,
        stats.nodes,
        stats.memory_bytes as f64 / stats.pages as f64,
    );
    drop(index);
}

/// Allocation calls per `match_prefix_into` hit, once its buffer has grown.
fn allocations_per_hit(len: usize) {
    let fx = match_fixture(len);
    let mut out = Match::default();
    fx.index
        .match_prefix_into(fx.ns, &fx.prompt, &mut out)
        .expect("match");
    const ROUNDS: usize = 1000;
    let before = alloc_calls();
    for _ in 0..ROUNDS {
        fx.index
            .match_prefix_into(fx.ns, black_box(&fx.prompt), &mut out)
            .expect("match");
        black_box(&out);
    }
    let calls = alloc_calls() - before;
    println!(
        "match_prefix_into/{}: {:.3} allocations per hit after warm-up",
        label(len),
        calls as f64 / ROUNDS as f64
    );
}

fn memory_report() {
    println!("page size {PAGE}; live heap bytes per cached page, tokens included (target <= 128)");
    memory_per_page("2000x8k_shared_1k", 2000, 8 << 10, 1 << 10);
    // The page-hash map grows by doubling: just past a growth step (here,
    // 2100 prompts) its share per page is near its worst.
    memory_per_page("2100x8k_shared_1k", 2100, 8 << 10, 1 << 10);
    memory_per_page("100000x256_distinct", 100_000, 256, 0);
    for len in SIZES {
        allocations_per_hit(len);
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let listing_or_profiling = args
        .iter()
        .any(|a| a == "--list" || a.starts_with("--profile-time"));
    if benching && !listing_or_profiling {
        memory_report();
    }
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_match_prefix(&mut c);
    bench_insert(&mut c);
    bench_insert_half_cached(&mut c);
    c.final_summary();
}
