//! Read-only memory maps of model files, so that weights go from the page cache into their final layout
//! (tiles, 16-bit rows) in one copy, with no intermediate buffer of the whole tensor.

use std::fs::File;
use std::path::Path;

/// A whole file mapped read-only.
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile").field("len", &self.map.len()).finish()
    }
}

impl MappedFile {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only and private. Its one hazard is another process truncating or
        // rewriting the file while it is mapped (a read of a vanished page faults): model files are not
        // edited while they load, the same contract as llama.cpp's mmap loading. The loaders keep a map only
        // while they copy the weights out of it.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Self { map })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// Whether to ask for huge pages: yes unless `MLX_SERVING_HUGE_PAGES=off` (for A/B measurements). Read once.
fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| std::env::var("MLX_SERVING_HUGE_PAGES").map_or(true, |v| v != "off"))
}

/// A zeroed `Vec<T>` of `len` items whose memory the kernel is asked to back with transparent huge pages
/// (`madvise(MADV_HUGEPAGE)` before the first touch). Weights are streamed whole at every decode step; with
/// 4 KiB pages that is a TLB miss every 4 KiB (a 1 GB model: 250 000 per token). Where the system does not
/// do huge pages the advice is ignored and this is a plain zeroed vector. Measured streaming one 544 MB bf16
/// matrix through `half_matmul` (one activation row, 2 threads, best of 15, 3 runs each, interleaved):
/// 36.8–37.4 GB/s with the advice, 33.3–34.5 without.
///
/// The zeroing, which is where the new pages fault in, runs on the kernel pool: faulting in a model's
/// weights and KV cache is most of a load, and it scales with the threads.
pub fn huge_zeroed<T: Copy + Default + Send>(len: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = len * std::mem::size_of::<T>();
        if bytes >= HUGE && huge_pages_wanted() {
            let start = v.as_mut_ptr() as usize;
            let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
            if hi > lo {
                // SAFETY: `[lo, hi)` lies inside the vector's own allocation (capacity `len`), which nothing
                // has touched yet; MADV_HUGEPAGE only advises how to back it and never changes its contents.
                unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
            }
        }
    }
    // 2 MiB of items per task: one huge page each.
    let chunk = ((2 << 20) / std::mem::size_of::<T>().max(1)).max(1);
    crate::pool::for_each_chunk_mut(&mut v.spare_capacity_mut()[..len], chunk, |_, items| {
        for x in items {
            x.write(T::default());
        }
    });
    // SAFETY: the capacity is at least `len`, and every one of the first `len` items was just written.
    unsafe { v.set_len(len) };
    v
}
