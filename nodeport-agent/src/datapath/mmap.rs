//! BPF array maps accessed through a memory mapping (maps created with BPF_F_MMAPABLE).
//!
//! Writing a Maglev table this way is one memory copy instead of one syscall per slot. The
//! kernel lays elements out `round_up(value_size, 8)` bytes apart. A reader in the datapath may
//! see an element mid-write; callers only write elements no packet can reach yet (a fresh
//! Maglev block, a fresh backend id) or that are being retired, and the following map update
//! syscall orders the writes before the switch.

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::MapData;
use bytemuck::Pod;

pub struct MmapArray<T: Pod> {
    base: NonNull<u8>,
    mapped_len: usize,
    entries: u32,
    stride: usize,
    /// Keeps the map's fd (and so the map) for as long as the mapping is used.
    _map: MapData,
    _values: PhantomData<T>,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes through &self /
// &mut self like any buffer.
unsafe impl<T: Pod> Send for MmapArray<T> {}
// SAFETY: as above.
unsafe impl<T: Pod> Sync for MmapArray<T> {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

impl<T: Pod> MmapArray<T> {
    /// Maps an array of `entries` elements (its max_entries).
    pub fn new(map: MapData, entries: u32) -> io::Result<Self> {
        let stride = size_of::<T>().div_ceil(8) * 8;
        let len = (entries as usize * stride).div_ceil(page_size()) * page_size();
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF array fd, shared, for the size the kernel allows.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            base,
            mapped_len: len,
            entries,
            stride,
            _map: map,
            _values: PhantomData,
        })
    }

    pub fn len(&self) -> u32 {
        self.entries
    }

    /// The map behind the mapping.
    pub fn map(&self) -> &MapData {
        &self._map
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn slot(&self, index: u32) -> io::Result<*mut T> {
        if index >= self.entries {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("index {index} beyond the array's {} entries", self.entries),
            ));
        }
        // SAFETY: index < entries, so the element lies inside the mapping.
        Ok(unsafe { self.base.as_ptr().add(index as usize * self.stride) }.cast::<T>())
    }

    pub fn get(&self, index: u32) -> io::Result<T> {
        // SAFETY: a valid element; the kernel may write concurrently, so read unaligned by value.
        Ok(unsafe { self.slot(index)?.read_unaligned() })
    }

    pub fn set(&mut self, index: u32, value: T) -> io::Result<()> {
        // SAFETY: a valid element of our writable shared mapping.
        unsafe { self.slot(index)?.write_unaligned(value) };
        Ok(())
    }

    /// Writes `values` into consecutive elements from `start`.
    pub fn set_range(&mut self, start: u32, values: &[T]) -> io::Result<()> {
        let end = u32::try_from(values.len())
            .ok()
            .and_then(|n| start.checked_add(n));
        if end.is_none_or(|end| end > self.entries) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range beyond the array",
            ));
        }
        for (i, v) in values.iter().enumerate() {
            self.set(start + i as u32, *v)?;
        }
        Ok(())
    }
}

impl<T: Pod> Drop for MmapArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_len) };
    }
}
