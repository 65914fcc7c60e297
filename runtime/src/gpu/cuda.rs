//! The CUDA path: the PTX module loaded through the driver API (cudarc, with
//! `libcuda.so` opened at run time, so nothing needs CUDA to build), device buffers for
//! the arena, cache, inputs, weights and tables, and one launch per dispatch on the
//! default stream.
//!
//! NVVM passes each `memref<?xT>` kernel argument as its descriptor: allocated pointer,
//! aligned pointer, offset, size and stride (five 64-bit parameters).

use std::ffi::{c_void, CString};

use cudarc::driver::{result, sys};

use super::program::{Arg, Graph, Program};
use super::Device;
use crate::model::RuntimeError;

fn err(what: &'static str) -> impl Fn(result::DriverError) -> RuntimeError {
    move |e| RuntimeError::Gpu(format!("CUDA: {what}: {e:?}"))
}

struct Buf {
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

pub struct Cuda {
    device: sys::CUdevice,
    module: sys::CUmodule,
    functions: Vec<sys::CUfunction>,
    bufs: Vec<Buf>,
    arena: usize,
    cache: usize,
    tokens: usize,
    types: usize,
    dims: usize,
    weights: Vec<usize>,
    tables: Vec<usize>,
    out_width: usize,
}

impl Cuda {
    pub fn new(
        p: &Program,
        ptx: &[u8],
        weights: &[Vec<f32>],
        tables: &[Vec<f32>],
    ) -> Result<Cuda, RuntimeError> {
        // SAFETY: probing only opens and closes the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(RuntimeError::Gpu(
                "no CUDA driver on this machine (libcuda.so not found); use --target vulkan or the CPU"
                    .into(),
            ));
        }
        result::init().map_err(err("initialise the driver"))?;
        let device = result::device::get(0).map_err(err("open device 0"))?;
        // SAFETY: the primary context of a valid device, made current on this thread.
        unsafe {
            let ctx = result::primary_ctx::retain(device).map_err(err("retain the primary context"))?;
            result::ctx::set_current(ctx).map_err(err("make the context current"))?;
        }
        let mut image = ptx.to_vec();
        image.push(0);
        // SAFETY: `image` is NUL-terminated PTX text and outlives the call.
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(err("load the PTX"))?;
        let mut c = Cuda {
            device,
            module,
            functions: Vec::new(),
            bufs: Vec::new(),
            arena: 0,
            cache: 0,
            tokens: 0,
            types: 0,
            dims: 0,
            weights: Vec::new(),
            tables: Vec::new(),
            out_width: p.output_width,
        };
        for k in &p.kernels {
            let name =
                CString::new(k.name.clone()).map_err(|_| RuntimeError::Gpu("bad kernel name".into()))?;
            // SAFETY: the module is loaded.
            let f = unsafe { result::module::get_function(module, name) }.map_err(err("find a kernel"))?;
            c.functions.push(f);
        }
        c.arena = c.alloc(p.arena_bytes as usize)?;
        c.cache = c.alloc(p.cache_bytes as usize)?;
        c.tokens = c.alloc(p.max_seq * 4)?;
        c.types = c.alloc(p.max_seq * 4)?;
        c.dims = c.alloc(16)?;
        for w in weights {
            let b = c.alloc(w.len() * 4)?;
            c.upload(b, w)?;
            c.weights.push(b);
        }
        for t in tables {
            let b = c.alloc(t.len() * 4)?;
            c.upload(b, t)?;
            c.tables.push(b);
        }
        c.clear_cache()?;
        Ok(c)
    }

    fn alloc(&mut self, bytes: usize) -> Result<usize, RuntimeError> {
        let bytes = bytes.max(16);
        // SAFETY: a plain allocation in the current context.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(err("allocate device memory"))?;
        self.bufs.push(Buf { ptr, bytes });
        Ok(self.bufs.len() - 1)
    }

    fn upload<T>(&self, b: usize, data: &[T]) -> Result<(), RuntimeError> {
        if std::mem::size_of_val(data) > self.bufs[b].bytes {
            return Err(RuntimeError::Gpu("bug: upload past a device buffer".into()));
        }
        // SAFETY: the destination holds at least `data`'s bytes.
        unsafe { result::memcpy_htod_sync(self.bufs[b].ptr, data) }.map_err(err("copy to the device"))
    }

    fn buf_of(&self, a: Arg) -> Result<(usize, u64), RuntimeError> {
        let missing = || RuntimeError::Gpu("a dispatch names a buffer the program lacks".into());
        Ok(match a {
            Arg::Arena(o) => (self.arena, o),
            Arg::Cache(o) => (self.cache, o),
            Arg::Weight(i) => (*self.weights.get(i).ok_or_else(missing)?, 0),
            Arg::Table(i) => (*self.tables.get(i).ok_or_else(missing)?, 0),
            Arg::Tokens => (self.tokens, 0),
            Arg::Types => (self.types, 0),
            Arg::Dims => (self.dims, 0),
        })
    }
}

impl Device for Cuda {
    fn run(
        &mut self,
        g: &Graph,
        t: usize,
        p: usize,
        tokens: &[i32],
        types: &[i32],
    ) -> Result<Vec<f32>, RuntimeError> {
        self.upload(self.tokens, tokens)?;
        self.upload(self.types, types)?;
        self.upload(self.dims, &[t as i32, p as i32, 0, 0])?;
        let (t, p) = (t as u64, p as u64);
        for d in &g.dispatches {
            let Some([gx, gy]) = d.groups(t, p).map_err(RuntimeError::Gpu)? else { continue };
            let f = *self
                .functions
                .get(d.kernel)
                .ok_or_else(|| RuntimeError::Gpu("a dispatch names no kernel".into()))?;
            let mut values: Vec<u64> = Vec::with_capacity(d.args.len() * 5);
            for &a in &d.args {
                let (b, off) = self.buf_of(a)?;
                let buf = &self.bufs[b];
                if off as usize >= buf.bytes {
                    return Err(RuntimeError::Gpu("bug: a buffer offset past its end".into()));
                }
                let ptr = buf.ptr + off;
                values.extend([ptr, ptr, 0, (buf.bytes as u64 - off) / 4, 1]);
            }
            let mut params: Vec<*mut c_void> =
                values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
            // SAFETY: the parameters match the kernel's descriptor-expanded signature
            // (the program lists its arguments), and point into live device buffers.
            unsafe {
                result::launch_kernel(f, (gx, gy, 1), (64, 1, 1), 0, std::ptr::null_mut(), &mut params)
            }
            .map_err(err("launch a kernel"))?;
        }
        result::ctx::synchronize().map_err(err("run the graph"))?;
        let rows = g.output_rows.eval(t, p) as usize;
        let mut out = vec![0f32; rows * self.out_width];
        let src = &self.bufs[self.arena];
        if g.output_offset as usize + out.len() * 4 > src.bytes {
            return Err(RuntimeError::Gpu("bug: the output lies outside the arena".into()));
        }
        // SAFETY: the range lies inside the arena (checked above).
        unsafe { result::memcpy_dtoh_sync(&mut out, src.ptr + g.output_offset) }
            .map_err(err("copy from the device"))?;
        Ok(out)
    }

    fn clear_cache(&mut self) -> Result<(), RuntimeError> {
        let b = &self.bufs[self.cache];
        // SAFETY: the whole cache buffer.
        unsafe { result::memset_d8_sync(b.ptr, 0, b.bytes) }.map_err(err("clear the cache"))
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // SAFETY: each buffer and the module are released once, then the context.
        unsafe {
            for b in &self.bufs {
                let _ = result::free_sync(b.ptr);
            }
            let _ = result::module::unload(self.module);
            let _ = result::primary_ctx::release(self.device);
        }
    }
}
