//! File I/O behind a small trait, so the disk tier can run on the real file
//! system ([`RealIo`]) or on one that fails on demand (`FaultyIo`, behind
//! `cfg(test)` or the `test-utils` feature).
//!
//! [`FileIo`] opens, removes and renames files and syncs directories;
//! [`IoFile`] is one open file: positioned reads and writes (`pread`,
//! `pwrite`, and their vectored forms), `fdatasync`, preallocation. Every
//! call may return fewer bytes than asked; [`read_exact_at`] and
//! [`write_all_at`] loop until done or until an error.
//!
//! [`RealIo`] opens data files with `O_DIRECT` where the file system allows
//! it (ext4, xfs, ...). A file system that refuses the flag at open (tmpfs
//! answers `EINVAL`) gets buffered I/O instead, and [`IoFile::is_direct`]
//! says which one a file got. Under `O_DIRECT` every buffer address, length
//! and file offset must be a multiple of [`DIRECT_ALIGN`]; [`AlignedBuf`] is
//! a heap buffer that satisfies that.

use std::alloc::{self, Layout};
use std::fmt;
use std::fs;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of buffers, lengths and offsets for `O_DIRECT` I/O. 4096 is the
/// largest logical block size of common devices, so it is always enough.
pub const DIRECT_ALIGN: usize = 4096;

/// Rounds `n` up to a multiple of [`DIRECT_ALIGN`].
pub const fn align_up(n: usize) -> usize {
    n.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

/// How to open a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenFlags {
    /// Create the file if it does not exist.
    pub create: bool,
    /// Truncate it to zero length.
    pub truncate: bool,
    /// Ask for `O_DIRECT` (granted only where the file system allows it).
    pub direct: bool,
}

impl OpenFlags {
    /// Open an existing file, buffered.
    pub const EXISTING: OpenFlags = OpenFlags {
        create: false,
        truncate: false,
        direct: false,
    };
}

/// Opens and manages files. Implementations are shared across threads.
pub trait FileIo: Send + Sync + fmt::Debug {
    /// Opens `path` for reading and writing.
    fn open(&self, path: &Path, flags: OpenFlags) -> io::Result<Box<dyn IoFile>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` with `from` (`rename(2)`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// The paths of the entries of a directory.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>>;
}

/// One open file. Positioned calls only, so one handle serves many threads.
pub trait IoFile: Send + Sync + fmt::Debug {
    /// `pread`: may read fewer bytes than asked; `Ok(0)` at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// `pwrite`: may write fewer bytes than asked.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// `preadv`: fills `bufs` in order; may read fewer bytes than asked.
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<usize>;
    /// `pwritev`: writes `bufs` in order; may write fewer bytes than asked.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<usize>;
    /// `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// Reserves `len` bytes on the device (`fallocate`; plain `set_len`
    /// where the file system cannot), so later writes inside cannot run out
    /// of space.
    fn allocate(&self, len: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current length of the file in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Whether this file was opened with `O_DIRECT`.
    fn is_direct(&self) -> bool;
    /// Takes an exclusive advisory lock (`flock`) without waiting; fails
    /// with [`io::ErrorKind::WouldBlock`] if another open file holds it.
    fn try_lock_exclusive(&self) -> io::Result<()>;
}

// ---- helpers over any IoFile -------------------------------------------------

/// Reads exactly `buf.len()` bytes at `offset`, looping over short reads.
pub fn read_exact_at(file: &dyn IoFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    read_exact_vectored_at(file, &mut [buf], offset)
}

/// Writes all of `buf` at `offset`, looping over short writes.
pub fn write_all_at(file: &dyn IoFile, buf: &[u8], offset: u64) -> io::Result<()> {
    write_all_vectored_at(file, &[buf], offset)
}

/// Fills every buffer of `bufs` from consecutive bytes at `offset`, looping
/// over short reads; end of file first is [`io::ErrorKind::UnexpectedEof`].
pub fn read_exact_vectored_at(
    file: &dyn IoFile,
    bufs: &mut [&mut [u8]],
    mut offset: u64,
) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0usize;
    while done < total {
        // The part of `bufs` not yet filled, as fresh slices.
        let mut rest: Vec<&mut [u8]> = Vec::with_capacity(bufs.len());
        let mut skip = done;
        for b in bufs.iter_mut() {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            rest.push(&mut b[skip..]);
            skip = 0;
        }
        let n = match file.read_vectored_at(&mut rest, offset) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file ended before the read was complete",
            ));
        }
        done += n;
        offset += n as u64;
    }
    Ok(())
}

/// Writes every buffer of `bufs` to consecutive bytes at `offset`, looping
/// over short writes; a write of zero bytes is [`io::ErrorKind::WriteZero`].
pub fn write_all_vectored_at(file: &dyn IoFile, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0usize;
    while done < total {
        let mut rest: Vec<&[u8]> = Vec::with_capacity(bufs.len());
        let mut skip = done;
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            rest.push(&b[skip..]);
            skip = 0;
        }
        let n = match file.write_vectored_at(&rest, offset) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write returned zero bytes",
            ));
        }
        done += n;
        offset += n as u64;
    }
    Ok(())
}

/// Reads a whole (small, buffered) file; `Ok(None)` if it does not exist.
pub fn read_whole_file(io: &dyn FileIo, path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match io.open(path, OpenFlags::EXISTING) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(file.size()?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
    let mut buf = vec![0u8; len];
    read_exact_at(&*file, &mut buf, 0)?;
    Ok(Some(buf))
}

/// Replaces `path` with `bytes` atomically and durably: writes a temporary
/// file beside it, syncs it, renames it over `path`, syncs the directory.
/// After a crash `path` holds either the old or the new contents.
pub fn replace_file(io: &dyn FileIo, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let file = io.open(
        &tmp,
        OpenFlags {
            create: true,
            truncate: true,
            direct: false,
        },
    )?;
    write_all_at(&*file, bytes, 0)?;
    file.sync_data()?;
    drop(file);
    io.rename(&tmp, path)?;
    io.sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The temporary name [`replace_file`] writes before renaming.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Removes a file; a file that does not exist is not an error.
pub fn remove_if_exists(io: &dyn FileIo, path: &Path) -> io::Result<()> {
    match io.remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

// ---- RealIo ------------------------------------------------------------------

/// The real file system through std and libc.
#[derive(Debug, Clone, Copy)]
pub struct RealIo {
    allow_direct: bool,
}

impl Default for RealIo {
    fn default() -> Self {
        Self::new()
    }
}

impl RealIo {
    /// Uses `O_DIRECT` where asked and the file system allows it.
    pub fn new() -> Self {
        Self { allow_direct: true }
    }

    /// Never uses `O_DIRECT` (everything goes through the page cache).
    pub fn buffered() -> Self {
        Self {
            allow_direct: false,
        }
    }

    /// Shared handle, as a pool config takes it.
    pub fn shared(self) -> Arc<dyn FileIo> {
        Arc::new(self)
    }
}

fn std_open(path: &Path, flags: OpenFlags, direct: bool) -> io::Result<fs::File> {
    let mut o = fs::OpenOptions::new();
    o.read(true)
        .write(true)
        .create(flags.create)
        .truncate(flags.truncate);
    #[cfg(target_os = "linux")]
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = direct;
    o.open(path)
}

/// Opens with `O_DIRECT` if `want_direct`, falling back to buffered I/O
/// where the file system refuses the flag with `EINVAL`.
fn open_direct_or_buffered(
    want_direct: bool,
    mut open: impl FnMut(bool) -> io::Result<fs::File>,
) -> io::Result<RealFile> {
    if want_direct {
        match open(true) {
            Ok(file) => return Ok(RealFile { file, direct: true }),
            // The file system does not do O_DIRECT (older tmpfs, some
            // FUSE and network file systems): buffered.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(RealFile {
        file: open(false)?,
        direct: false,
    })
}

impl FileIo for RealIo {
    fn open(&self, path: &Path, flags: OpenFlags) -> io::Result<Box<dyn IoFile>> {
        let want_direct = flags.direct && self.allow_direct && cfg!(target_os = "linux");
        let file = open_direct_or_buffered(want_direct, |direct| std_open(path, flags, direct))?;
        Ok(Box::new(file))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        fs::File::open(path)?.sync_all()
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect()
    }
}

/// A file opened by [`RealIo`].
#[derive(Debug)]
struct RealFile {
    file: fs::File,
    direct: bool,
}

fn iov_len_check(n: usize) -> io::Result<libc::c_int> {
    libc::c_int::try_from(n)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many buffers"))
}

fn offset_check(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))
}

impl IoFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.file.write_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<usize> {
        if let [one] = bufs {
            return self.file.read_at(one, offset);
        }
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let count = iov_len_check(iov.len())?;
        let off = offset_check(offset)?;
        // SAFETY: each iovec points into a distinct `&mut [u8]` from `bufs`
        // with its exact length; those borrows outlive the call, so the
        // kernel writes only into memory we exclusively own. The fd is open
        // for the lifetime of `self.file`.
        let n = unsafe { libc::preadv(self.file.as_raw_fd(), iov.as_ptr(), count, off) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<usize> {
        if let [one] = bufs {
            return self.file.write_at(one, offset);
        }
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let count = iov_len_check(iov.len())?;
        let off = offset_check(offset)?;
        // SAFETY: each iovec points into a live `&[u8]` from `bufs` with its
        // exact length; `pwritev` only reads through them (the `*mut` in
        // `iovec` is the C type, not a licence to write). The fd is open for
        // the lifetime of `self.file`.
        let n = unsafe { libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), count, off) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            let l = offset_check(len)?;
            // SAFETY: fallocate on an fd we own, with mode 0 (allocate and
            // extend); it touches no memory of ours.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, l) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
        }
        if self.file.metadata()?.len() < len {
            self.file.set_len(len)?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn is_direct(&self) -> bool {
        self.direct
    }

    fn try_lock_exclusive(&self) -> io::Result<()> {
        // SAFETY: flock on an fd we own; it touches no memory of ours.
        let r = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the file is locked by another open file",
            ));
        }
        Err(e)
    }
}

// ---- AlignedBuf --------------------------------------------------------------

/// A zero-initialised heap buffer whose address and capacity are multiples
/// of [`DIRECT_ALIGN`], as `O_DIRECT` needs. Its length may be smaller than
/// its capacity; `Deref` gives the first `len` bytes.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Vec<u8>`) and
// has no interior mutability; moving it to or sharing `&` of it with another
// thread is as sound as for `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` only gives `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes (capacity rounded up to the alignment).
    pub fn zeroed(len: usize) -> Self {
        let cap = align_up(len.max(1));
        let layout = Self::layout(cap);
        // SAFETY: `layout` has a non-zero size (`cap >= DIRECT_ALIGN`).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len, cap }
    }

    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, DIRECT_ALIGN).expect("buffer size overflows isize")
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length (at most the capacity); bytes past the old length
    /// keep whatever they held (initialised: zero or earlier contents).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "length {len} over capacity {}", self.cap);
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `cap >= len` initialised bytes (allocated
        // zeroed) owned by `self`, borrowed shared for the returned lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, borrowed exclusively through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout
        // and is freed once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

/// Whether `buf` may be handed to `O_DIRECT` I/O as it is.
pub fn is_direct_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize) % DIRECT_ALIGN == 0 && buf.len() % DIRECT_ALIGN == 0
}

// ---- FaultyIo ----------------------------------------------------------------

#[cfg(any(test, feature = "test-utils"))]
pub use faulty::{Fault, FaultCtx, FaultyIo, IoOp};

#[cfg(any(test, feature = "test-utils"))]
mod faulty {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The kind of call a fault decision is asked about.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum IoOp {
        Open,
        Read,
        Write,
        Sync,
        Allocate,
        SetLen,
        Remove,
        Rename,
        SyncDir,
    }

    /// One call, as the fault plan sees it.
    #[derive(Debug)]
    pub struct FaultCtx<'a> {
        pub op: IoOp,
        pub path: &'a Path,
        /// File offset (reads and writes), else 0.
        pub offset: u64,
        /// Bytes asked for (reads and writes; `allocate`/`set_len`: the
        /// length), else 0.
        pub len: u64,
        /// Calls seen by this `FaultyIo` before this one.
        pub seq: u64,
    }

    impl FaultCtx<'_> {
        /// Whether the call is on a file whose name ends with `suffix`.
        pub fn file_ends_with(&self, suffix: &str) -> bool {
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(suffix))
        }
    }

    /// What to do with one call.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Fault {
        /// Pass the call through.
        None,
        /// Fail without doing anything, with this errno.
        Errno(i32),
        /// Fail with `ENOSPC` (writes and `allocate`).
        NoSpace,
        /// Reads and writes: do only the first `n` bytes (rounded down to
        /// [`DIRECT_ALIGN`] on an `O_DIRECT` file) and report that count.
        Short(usize),
        /// Writes: do the first `n` bytes (rounded as for `Short`), then
        /// fail with `EIO`: a torn write.
        Torn(usize),
        /// Reads: pass through, then flip the lowest bit of the byte at
        /// this index of what was read (if it read that far).
        FlipBit(usize),
    }

    type Plan = Box<dyn FnMut(&FaultCtx<'_>) -> Fault + Send>;

    struct Shared {
        plan: Mutex<Option<Plan>>,
        seq: AtomicU64,
        injected: AtomicU64,
    }

    /// A [`FileIo`] that wraps another and injects faults chosen by a plan:
    /// a closure asked before every call. Clones share the plan, so a test
    /// keeps one clone and hands another to the pool.
    #[derive(Clone)]
    pub struct FaultyIo {
        inner: Arc<dyn FileIo>,
        shared: Arc<Shared>,
    }

    impl fmt::Debug for FaultyIo {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("FaultyIo")
                .field("inner", &self.inner)
                .field("calls", &self.calls())
                .field("injected", &self.injected())
                .finish()
        }
    }

    impl FaultyIo {
        /// Passes everything through until a plan is set.
        pub fn new(inner: Arc<dyn FileIo>) -> Self {
            Self {
                inner,
                shared: Arc::new(Shared {
                    plan: Mutex::new(None),
                    seq: AtomicU64::new(0),
                    injected: AtomicU64::new(0),
                }),
            }
        }

        /// Shared handle, as a pool config takes it.
        pub fn shared(&self) -> Arc<dyn FileIo> {
            Arc::new(self.clone())
        }

        /// Decides every later call with `plan`.
        pub fn set_plan(&self, plan: impl FnMut(&FaultCtx<'_>) -> Fault + Send + 'static) {
            *self.shared.plan.lock() = Some(Box::new(plan));
        }

        /// Passes every later call through.
        pub fn clear_plan(&self) {
            *self.shared.plan.lock() = None;
        }

        /// Gives the next `count` writes to files whose name ends with
        /// `suffix` the fault `fault`; everything else passes.
        pub fn fail_writes(&self, suffix: &'static str, count: u64, fault: Fault) {
            let mut left = count;
            self.set_plan(move |c| {
                if c.op == IoOp::Write && left > 0 && c.file_ends_with(suffix) {
                    left -= 1;
                    fault
                } else {
                    Fault::None
                }
            });
        }

        /// Calls seen so far.
        pub fn calls(&self) -> u64 {
            self.shared.seq.load(Ordering::Relaxed)
        }

        /// Faults injected so far (calls whose decision was not `None`).
        pub fn injected(&self) -> u64 {
            self.shared.injected.load(Ordering::Relaxed)
        }

        fn decide(shared: &Shared, op: IoOp, path: &Path, offset: u64, len: u64) -> Fault {
            let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
            let mut plan = shared.plan.lock();
            let fault = match plan.as_mut() {
                Some(p) => p(&FaultCtx {
                    op,
                    path,
                    offset,
                    len,
                    seq,
                }),
                None => Fault::None,
            };
            if fault != Fault::None {
                shared.injected.fetch_add(1, Ordering::Relaxed);
            }
            fault
        }

        /// Applies a decision for a call with no byte count.
        fn plain(&self, op: IoOp, path: &Path, len: u64) -> io::Result<()> {
            check_plain(Self::decide(&self.shared, op, path, 0, len))
        }
    }

    fn check_plain(f: Fault) -> io::Result<()> {
        match f {
            Fault::Errno(e) => Err(io::Error::from_raw_os_error(e)),
            Fault::NoSpace => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            Fault::Torn(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Fault::None | Fault::Short(_) | Fault::FlipBit(_) => Ok(()),
        }
    }

    impl FileIo for FaultyIo {
        fn open(&self, path: &Path, flags: OpenFlags) -> io::Result<Box<dyn IoFile>> {
            self.plain(IoOp::Open, path, 0)?;
            let inner = self.inner.open(path, flags)?;
            Ok(Box::new(FaultyFile {
                inner,
                path: path.to_path_buf(),
                shared: self.shared.clone(),
            }))
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            self.plain(IoOp::Remove, path, 0)?;
            self.inner.remove_file(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.plain(IoOp::Rename, to, 0)?;
            self.inner.rename(from, to)
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.inner.create_dir_all(path)
        }
        fn sync_dir(&self, path: &Path) -> io::Result<()> {
            self.plain(IoOp::SyncDir, path, 0)?;
            self.inner.sync_dir(path)
        }
        fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
            self.inner.list_dir(path)
        }
    }

    struct FaultyFile {
        inner: Box<dyn IoFile>,
        path: PathBuf,
        shared: Arc<Shared>,
    }

    impl fmt::Debug for FaultyFile {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("FaultyFile")
                .field("path", &self.path)
                .field("inner", &self.inner)
                .finish()
        }
    }

    impl FaultyFile {
        fn decide(&self, op: IoOp, offset: u64, len: u64) -> Fault {
            FaultyIo::decide(&self.shared, op, &self.path, offset, len)
        }

        /// `n` rounded so that the inner file accepts it.
        fn cut(&self, n: usize, total: usize) -> usize {
            let n = n.min(total);
            if self.inner.is_direct() {
                n / DIRECT_ALIGN * DIRECT_ALIGN
            } else {
                n
            }
        }

        /// Writes the first `n` bytes of `bufs` through the inner file.
        fn write_prefix(&self, bufs: &[&[u8]], n: usize, offset: u64) -> io::Result<()> {
            if n == 0 {
                return Ok(());
            }
            let mut gathered = AlignedBuf::zeroed(n);
            let mut at = 0;
            for b in bufs {
                let take = b.len().min(n - at);
                gathered[at..at + take].copy_from_slice(&b[..take]);
                at += take;
                if at == n {
                    break;
                }
            }
            write_all_at(&*self.inner, &gathered, offset)
        }
    }

    impl IoFile for FaultyFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.read_vectored_at(&mut [buf], offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
            self.write_vectored_at(&[buf], offset)
        }

        fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<usize> {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            match self.decide(IoOp::Read, offset, total as u64) {
                Fault::None => self.inner.read_vectored_at(bufs, offset),
                Fault::Short(n) => {
                    let n = self.cut(n, total);
                    let mut got = 0;
                    for b in bufs.iter_mut() {
                        let take = b.len().min(n - got);
                        if take == 0 {
                            break;
                        }
                        read_exact_at(&*self.inner, &mut b[..take], offset + got as u64)?;
                        got += take;
                    }
                    Ok(got)
                }
                Fault::FlipBit(at) => {
                    let n = self.inner.read_vectored_at(bufs, offset)?;
                    if at < n {
                        let mut skip = at;
                        for b in bufs.iter_mut() {
                            if skip < b.len() {
                                b[skip] ^= 1;
                                break;
                            }
                            skip -= b.len();
                        }
                    }
                    Ok(n)
                }
                f => check_plain(f).map(|()| 0),
            }
        }

        fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<usize> {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            match self.decide(IoOp::Write, offset, total as u64) {
                Fault::None | Fault::FlipBit(_) => self.inner.write_vectored_at(bufs, offset),
                Fault::Short(n) => {
                    let n = self.cut(n, total);
                    self.write_prefix(bufs, n, offset)?;
                    Ok(n)
                }
                Fault::Torn(n) => {
                    let n = self.cut(n, total);
                    self.write_prefix(bufs, n, offset)?;
                    Err(io::Error::from_raw_os_error(libc::EIO))
                }
                f => check_plain(f).map(|()| 0),
            }
        }

        fn sync_data(&self) -> io::Result<()> {
            check_plain(self.decide(IoOp::Sync, 0, 0))?;
            self.inner.sync_data()
        }

        fn allocate(&self, len: u64) -> io::Result<()> {
            check_plain(self.decide(IoOp::Allocate, 0, len))?;
            self.inner.allocate(len)
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            check_plain(self.decide(IoOp::SetLen, 0, len))?;
            self.inner.set_len(len)
        }

        fn size(&self) -> io::Result<u64> {
            self.inner.size()
        }

        fn is_direct(&self) -> bool {
            self.inner.is_direct()
        }

        fn try_lock_exclusive(&self) -> io::Result<()> {
            self.inner.try_lock_exclusive()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(b.capacity() % DIRECT_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn vectored_round_trip_and_short_writes() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = FaultyIo::new(RealIo::new().shared());
        let path = dir.path().join("f.dat");
        let flags = OpenFlags {
            create: true,
            truncate: true,
            direct: true,
        };
        let f = faulty.open(&path, flags).unwrap();
        f.allocate(3 * 4096).unwrap();
        let mut a = AlignedBuf::zeroed(8192);
        a.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
        let mut b = AlignedBuf::zeroed(4096);
        b.fill(7);
        // Every write comes back short once: the loop must finish the job.
        let mut flip = false;
        faulty.set_plan(move |c| {
            flip = !flip;
            if c.op == IoOp::Write && flip {
                Fault::Short(4096)
            } else {
                Fault::None
            }
        });
        write_all_vectored_at(&*f, &[&a, &b], 0).unwrap();
        faulty.clear_plan();
        let mut ra = AlignedBuf::zeroed(8192);
        let mut rb = AlignedBuf::zeroed(4096);
        read_exact_vectored_at(&*f, &mut [&mut ra, &mut rb], 0).unwrap();
        assert_eq!(&ra[..], &a[..]);
        assert_eq!(&rb[..], &b[..]);
        assert!(faulty.injected() >= 1);
    }

    #[test]
    fn einval_on_direct_open_falls_back_to_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let flags = OpenFlags {
            create: true,
            truncate: false,
            direct: true,
        };
        let mut tries = Vec::new();
        let f = open_direct_or_buffered(true, |direct| {
            tries.push(direct);
            if direct {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                std_open(&path, flags, false)
            }
        })
        .unwrap();
        assert!(!f.is_direct());
        assert_eq!(tries, [true, false]);
        // Other errors are errors, not a reason to fall back.
        let r = open_direct_or_buffered(true, |_| Err(io::Error::from_raw_os_error(libc::EACCES)));
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EACCES));
        // Where the file system allows it, the file is direct.
        let real = RealIo::new().open(&path, flags).unwrap();
        println!("O_DIRECT in the temp dir: {}", real.is_direct());
    }

    #[test]
    fn replace_file_is_atomic_rename() {
        let dir = tempfile::tempdir().unwrap();
        let io = RealIo::new();
        let p = dir.path().join("x");
        replace_file(&io, &p, b"one").unwrap();
        replace_file(&io, &p, b"two!").unwrap();
        assert_eq!(read_whole_file(&io, &p).unwrap().unwrap(), b"two!");
        assert!(!tmp_path(&p).exists());
        assert!(read_whole_file(&io, &dir.path().join("none"))
            .unwrap()
            .is_none());
    }
}
