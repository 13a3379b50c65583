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
