//! Memory for the weights a session binds: each buffer is its own anonymous mapping,
//! aligned to 2 MB, and the kernel is asked to back it with 2 MB pages. A decode step
//! streams every weight once; with 4 KB pages its TLB misses cost ~7% of the memory
//! bandwidth on the machines we measure (the library does the same for the arena, the
//! KV cache and the weights it re-packs).

use memmap2::{Advice, MmapMut};

const HUGE: usize = 2 << 20;

/// Element types any bit pattern of which is a value.
pub(crate) trait Plain: Copy {}
impl Plain for u8 {}
impl Plain for u16 {}
impl Plain for f32 {}

pub(crate) struct Pages {
    map: MmapMut,
    /// Where the 2 MB-aligned buffer starts in `map`.
    offset: usize,
    len: usize,
}

impl Pages {
    /// `len` zeroed bytes.
    pub(crate) fn zeroed(len: usize) -> std::io::Result<Pages> {
        let map = MmapMut::map_anon(len + HUGE)?;
        let offset = map.as_ptr().align_offset(HUGE);
        if len > 0 {
            // Advice only: where the kernel has no 2 MB pages to give, 4 KB ones serve.
            let _ = map.advise_range(Advice::HugePage, offset, len);
        }
        Ok(Pages { map, offset, len })
    }

    /// A copy of `values`.
    pub(crate) fn copy_of<T: Plain>(values: &[T]) -> std::io::Result<Pages> {
        let mut p = Pages::zeroed(std::mem::size_of_val(values))?;
        p.as_mut_slice::<T>().copy_from_slice(values);
        Ok(p)
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.map[self.offset..].as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The buffer as `len / size_of::<T>()` elements.
    pub(crate) fn as_mut_slice<T: Plain>(&mut self) -> &mut [T] {
        let bytes = &mut self.map[self.offset..self.offset + self.len];
        // SAFETY: the buffer starts 2 MB-aligned, so aligned for `T`; the slice covers
        // whole elements inside it, and every bit pattern is a `T` (`Plain`).
        unsafe {
            std::slice::from_raw_parts_mut(
                bytes.as_mut_ptr() as *mut T,
                bytes.len() / std::mem::size_of::<T>(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_hold_what_was_copied() {
        for n in [0usize, 1, 1000, 3 << 20] {
            let v: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let p = Pages::copy_of(&v).unwrap();
            assert_eq!(p.as_ptr() as usize % HUGE, 0);
            assert_eq!(p.len(), 4 * n);
            // SAFETY: `p` holds `n` f32 values.
            let back = unsafe { std::slice::from_raw_parts(p.as_ptr() as *const f32, n) };
            assert_eq!(back, &v[..]);
        }
    }
}
