//! The Vulkan path (ash, with the loader opened at run time): one compute pipeline per
//! kernel, one descriptor set per dispatch written once at load, and per call one command
//! buffer that replays the dispatch list with a barrier between dispatches.
//!
//! Every buffer is host-visible and coherent, so inputs are written and outputs read in
//! place; on lavapipe (Mesa's CPU implementation) that is the only kind of memory, and on
//! a discrete GPU it is correct but reads weights over the bus.

use std::ffi::CString;

use ash::vk;

use super::program::{Arg, Graph, Program};
use super::Device;
use crate::model::RuntimeError;

fn err(what: &str) -> impl Fn(vk::Result) -> RuntimeError + '_ {
    move |e| RuntimeError::Gpu(format!("Vulkan: {what}: {e}"))
}

struct Buffer {
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    ptr: *mut u8,
    size: u64,
}

struct Kernel {
    pipeline: vk::Pipeline,
    layout: vk::PipelineLayout,
    set_layout: vk::DescriptorSetLayout,
}

pub struct Vulkan {
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    queue: vk::Queue,
    cmd_pool: vk::CommandPool,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
    desc_pool: vk::DescriptorPool,
    shader: vk::ShaderModule,
    kernels: Vec<Kernel>,
    buffers: Vec<Buffer>,
    /// Per graph (by address of its dispatch list), one set per dispatch.
    sets: Vec<(*const Graph, Vec<vk::DescriptorSet>)>,
    out_width: usize,
    arena: usize,
    cache: usize,
    tokens: usize,
    types: usize,
    dims: usize,
}

impl Vulkan {
    pub fn new(
        p: &Program,
        spirv: &[u8],
        weights: &[Vec<f32>],
        tables: &[Vec<f32>],
    ) -> Result<Vulkan, RuntimeError> {
        // SAFETY: loading the Vulkan loader runs its initialisation; no other code of ours
        // touches it.
        let entry = unsafe { ash::Entry::load() }
            .map_err(|e| RuntimeError::Gpu(format!("no Vulkan loader (libvulkan.so.1): {e}")))?;
        // SAFETY: every Vulkan call below gets handles created here, in order, and create
        // infos that outlive the call.
        unsafe { Self::init(entry, p, spirv, weights, tables) }
    }

    unsafe fn init(
        entry: ash::Entry,
        p: &Program,
        spirv: &[u8],
        weights: &[Vec<f32>],
        tables: &[Vec<f32>],
    ) -> Result<Vulkan, RuntimeError> {
        // SAFETY: see `new`.
        unsafe {
            let app =
                vk::ApplicationInfo::default().application_name(c"tfc").api_version(vk::API_VERSION_1_3);
            let instance = entry
                .create_instance(&vk::InstanceCreateInfo::default().application_info(&app), None)
                .map_err(err("create instance"))?;
            let devices = instance.enumerate_physical_devices().map_err(err("enumerate devices"))?;
            let mut chosen = None;
            for &pd in &devices {
                let fams = instance.get_physical_device_queue_family_properties(pd);
                if let Some(q) = fams.iter().position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE)) {
                    chosen = Some((pd, q as u32));
                    break;
                }
            }
            let Some((pd, qf)) = chosen else {
                instance.destroy_instance(None);
                return Err(RuntimeError::Gpu("Vulkan: no device with a compute queue".into()));
            };
            let limits = instance.get_physical_device_properties(pd).limits;
            let prio = [1.0f32];
            let qci = vk::DeviceQueueCreateInfo::default().queue_family_index(qf).queue_priorities(&prio);
            let device = match instance.create_device(
                pd,
                &vk::DeviceCreateInfo::default().queue_create_infos(std::slice::from_ref(&qci)),
                None,
            ) {
                Ok(d) => d,
                Err(e) => {
                    instance.destroy_instance(None);
                    return Err(err("create device")(e));
                }
            };
            let queue = device.get_device_queue(qf, 0);
            let mem_props = instance.get_physical_device_memory_properties(pd);
            let mut v = Vulkan {
                _entry: entry,
                instance,
                device,
                queue,
                cmd_pool: vk::CommandPool::null(),
                cmd: vk::CommandBuffer::null(),
                fence: vk::Fence::null(),
                desc_pool: vk::DescriptorPool::null(),
                shader: vk::ShaderModule::null(),
                kernels: Vec::new(),
                buffers: Vec::new(),
                sets: Vec::new(),
                out_width: p.output_width,
                arena: 0,
                cache: 0,
                tokens: 0,
                types: 0,
                dims: 0,
            };
            // From here on `Drop` releases whatever was created.
            let align = limits.min_storage_buffer_offset_alignment.max(1);
            v.arena = v.buffer(&mem_props, p.arena_bytes.max(16))?;
            v.cache = v.buffer(&mem_props, p.cache_bytes.max(16))?;
            v.tokens = v.buffer(&mem_props, (p.max_seq as u64 * 4).max(16))?;
            v.types = v.buffer(&mem_props, (p.max_seq as u64 * 4).max(16))?;
            v.dims = v.buffer(&mem_props, 16)?;
            let mut weight_bufs = Vec::new();
            for w in weights {
                let b = v.buffer(&mem_props, (w.len() as u64 * 4).max(16))?;
                v.write(b, 0, w);
                weight_bufs.push(b);
            }
            let mut table_bufs = Vec::new();
            for t in tables {
                let b = v.buffer(&mem_props, (t.len() as u64 * 4).max(16))?;
                v.write(b, 0, t);
                table_bufs.push(b);
            }
            let cache = v.cache;
            v.fill_zero(cache);

            let words = ash::util::read_spv(&mut std::io::Cursor::new(spirv))
                .map_err(|e| RuntimeError::Gpu(format!("the SPIR-V binary is malformed: {e}")))?;
            v.shader = v
                .device
                .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None)
                .map_err(err("create shader module"))?;
            for k in &p.kernels {
                let bindings: Vec<_> = (0..k.args.len() as u32)
                    .map(|i| {
                        vk::DescriptorSetLayoutBinding::default()
                            .binding(i)
                            .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                            .descriptor_count(1)
                            .stage_flags(vk::ShaderStageFlags::COMPUTE)
                    })
                    .collect();
                let set_layout = v
                    .device
                    .create_descriptor_set_layout(
                        &vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings),
                        None,
                    )
                    .map_err(err("create descriptor set layout"))?;
                let layout = v
                    .device
                    .create_pipeline_layout(
                        &vk::PipelineLayoutCreateInfo::default()
                            .set_layouts(std::slice::from_ref(&set_layout)),
                        None,
                    )
                    .map_err(err("create pipeline layout"))?;
                let name =
                    CString::new(k.name.clone()).map_err(|_| RuntimeError::Gpu("bad kernel name".into()))?;
                let stage = vk::PipelineShaderStageCreateInfo::default()
                    .stage(vk::ShaderStageFlags::COMPUTE)
                    .module(v.shader)
                    .name(&name);
                let ci = vk::ComputePipelineCreateInfo::default().stage(stage).layout(layout);
                let pipeline = v
                    .device
                    .create_compute_pipelines(vk::PipelineCache::null(), &[ci], None)
                    .map_err(|(_, e)| err("create compute pipeline")(e))?[0];
                v.kernels.push(Kernel { pipeline, layout, set_layout });
            }

            // One descriptor set per dispatch of every graph, written once.
            let graphs: Vec<&Graph> =
                [Some(&p.prefill), Some(&p.prefill_all), p.decode.as_ref()].into_iter().flatten().collect();
            let n_sets: usize = graphs.iter().map(|g| g.dispatches.len()).sum();
            let n_bufs: usize = graphs.iter().flat_map(|g| &g.dispatches).map(|d| d.args.len()).sum();
            if n_sets > 0 {
                let sizes = [vk::DescriptorPoolSize::default()
                    .ty(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(n_bufs as u32)];
                v.desc_pool = v
                    .device
                    .create_descriptor_pool(
                        &vk::DescriptorPoolCreateInfo::default().max_sets(n_sets as u32).pool_sizes(&sizes),
                        None,
                    )
                    .map_err(err("create descriptor pool"))?;
            }
            for g in graphs {
                let mut sets = Vec::new();
                for d in &g.dispatches {
                    let k = v
                        .kernels
                        .get(d.kernel)
                        .ok_or_else(|| RuntimeError::Gpu("a dispatch names no kernel".into()))?;
                    if d.args.len() != p.kernels[d.kernel].args.len() {
                        return Err(RuntimeError::Gpu(format!(
                            "a dispatch of `{}` has the wrong arguments",
                            p.kernels[d.kernel].name
                        )));
                    }
                    let set = v
                        .device
                        .allocate_descriptor_sets(
                            &vk::DescriptorSetAllocateInfo::default()
                                .descriptor_pool(v.desc_pool)
                                .set_layouts(std::slice::from_ref(&k.set_layout)),
                        )
                        .map_err(err("allocate descriptor set"))?[0];
                    let mut infos = Vec::new();
                    for a in &d.args {
                        let (b, off) = match *a {
                            Arg::Arena(o) => (v.arena, o),
                            Arg::Cache(o) => (v.cache, o),
                            Arg::Weight(i) => (
                                *weight_bufs
                                    .get(i)
                                    .ok_or_else(|| RuntimeError::Gpu("a dispatch names no weight".into()))?,
                                0,
                            ),
                            Arg::Table(i) => (
                                *table_bufs
                                    .get(i)
                                    .ok_or_else(|| RuntimeError::Gpu("a dispatch names no table".into()))?,
                                0,
                            ),
                            Arg::Tokens => (v.tokens, 0),
                            Arg::Types => (v.types, 0),
                            Arg::Dims => (v.dims, 0),
                        };
                        if off % align != 0 || off >= v.buffers[b].size {
                            return Err(RuntimeError::Gpu(format!(
                                "buffer offset {off} is not usable (the device wants multiples of {align})"
                            )));
                        }
                        infos.push(
                            vk::DescriptorBufferInfo::default()
                                .buffer(v.buffers[b].buffer)
                                .offset(off)
                                .range(vk::WHOLE_SIZE),
                        );
                    }
                    let writes: Vec<_> = infos
                        .iter()
                        .enumerate()
                        .map(|(i, info)| {
                            vk::WriteDescriptorSet::default()
                                .dst_set(set)
                                .dst_binding(i as u32)
                                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                                .buffer_info(std::slice::from_ref(info))
                        })
                        .collect();
                    v.device.update_descriptor_sets(&writes, &[]);
                    sets.push(set);
                }
                v.sets.push((g as *const Graph, sets));
            }
            v.cmd_pool = v
                .device
                .create_command_pool(
                    &vk::CommandPoolCreateInfo::default()
                        .queue_family_index(qf)
                        .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                    None,
                )
                .map_err(err("create command pool"))?;
            v.cmd = v
                .device
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(v.cmd_pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(1),
                )
                .map_err(err("allocate command buffer"))?[0];
            v.fence =
                v.device.create_fence(&vk::FenceCreateInfo::default(), None).map_err(err("create fence"))?;
            Ok(v)
        }
    }

    /// A host-visible, coherent storage buffer, mapped for its lifetime; its index.
    unsafe fn buffer(
        &mut self,
        props: &vk::PhysicalDeviceMemoryProperties,
        size: u64,
    ) -> Result<usize, RuntimeError> {
        // SAFETY: the device is live; the memory is bound and mapped once.
        unsafe {
            let buffer = self
                .device
                .create_buffer(
                    &vk::BufferCreateInfo::default()
                        .size(size)
                        .usage(vk::BufferUsageFlags::STORAGE_BUFFER)
                        .sharing_mode(vk::SharingMode::EXCLUSIVE),
                    None,
                )
                .map_err(err("create buffer"))?;
            let req = self.device.get_buffer_memory_requirements(buffer);
            let want = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
            let Some(ty) = (0..props.memory_type_count).find(|&i| {
                req.memory_type_bits & (1 << i) != 0
                    && props.memory_types[i as usize].property_flags.contains(want)
            }) else {
                self.device.destroy_buffer(buffer, None);
                return Err(RuntimeError::Gpu("Vulkan: no host-visible coherent memory".into()));
            };
            let memory = match self.device.allocate_memory(
                &vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(ty),
                None,
            ) {
                Ok(m) => m,
                Err(e) => {
                    self.device.destroy_buffer(buffer, None);
                    return Err(err("allocate memory")(e));
                }
            };
            self.buffers.push(Buffer { buffer, memory, ptr: std::ptr::null_mut(), size });
            self.device.bind_buffer_memory(buffer, memory, 0).map_err(err("bind memory"))?;
            let ptr = self
                .device
                .map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
                .map_err(err("map memory"))?;
            let i = self.buffers.len() - 1;
            self.buffers[i].ptr = ptr as *mut u8;
            Ok(i)
        }
    }

    fn write<T: Copy>(&self, b: usize, byte_off: usize, data: &[T]) {
        let buf = &self.buffers[b];
        let bytes = std::mem::size_of_val(data);
        assert!(byte_off + bytes <= buf.size as usize, "write past a device buffer");
        // SAFETY: the mapping covers `size` bytes and nothing else aliases it while no
        // submission runs (`run` waits for each).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, buf.ptr.add(byte_off), bytes) };
    }

    fn fill_zero(&self, b: usize) {
        let buf = &self.buffers[b];
        // SAFETY: as in `write`.
        unsafe { std::ptr::write_bytes(buf.ptr, 0, buf.size as usize) };
    }
}

impl Device for Vulkan {
    fn run(
        &mut self,
        g: &Graph,
        t: usize,
        p: usize,
        tokens: &[i32],
        types: &[i32],
    ) -> Result<Vec<f32>, RuntimeError> {
        let sets = self
            .sets
            .iter()
            .find(|(k, _)| std::ptr::eq(*k, g))
            .map(|(_, s)| s.clone())
            .ok_or_else(|| RuntimeError::Gpu("bug: a graph of another program".into()))?;
        self.write(self.tokens, 0, tokens);
        self.write(self.types, 0, types);
        self.write(self.dims, 0, &[t as i32, p as i32, 0, 0]);
        let (t, p) = (t as u64, p as u64);
        // SAFETY: the command buffer is idle (each submission is waited for); all handles
        // belong to this device.
        unsafe {
            let d = &self.device;
            d.begin_command_buffer(
                self.cmd,
                &vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )
            .map_err(err("begin command buffer"))?;
            let barrier = vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::SHADER_WRITE)
                .dst_access_mask(vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE);
            for (disp, set) in g.dispatches.iter().zip(&sets) {
                let k = &self.kernels[disp.kernel];
                let Some([gx, gy]) = disp.groups(t, p).map_err(RuntimeError::Gpu)? else { continue };
                d.cmd_bind_pipeline(self.cmd, vk::PipelineBindPoint::COMPUTE, k.pipeline);
                d.cmd_bind_descriptor_sets(
                    self.cmd,
                    vk::PipelineBindPoint::COMPUTE,
                    k.layout,
                    0,
                    &[*set],
                    &[],
                );
                d.cmd_dispatch(self.cmd, gx, gy, 1);
                d.cmd_pipeline_barrier(
                    self.cmd,
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::DependencyFlags::empty(),
                    &[barrier],
                    &[],
                    &[],
                );
            }
            let to_host = vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::SHADER_WRITE)
                .dst_access_mask(vk::AccessFlags::HOST_READ);
            d.cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &[to_host],
                &[],
                &[],
            );
            d.end_command_buffer(self.cmd).map_err(err("end command buffer"))?;
            let submit = vk::SubmitInfo::default().command_buffers(std::slice::from_ref(&self.cmd));
            d.queue_submit(self.queue, &[submit], self.fence).map_err(err("submit"))?;
            d.wait_for_fences(&[self.fence], true, u64::MAX).map_err(err("wait"))?;
            d.reset_fences(&[self.fence]).map_err(err("reset fence"))?;
        }
        let rows = g.output_rows.eval(t, p) as usize;
        let n = rows * self.out_width;
        let buf = &self.buffers[self.arena];
        let off = g.output_offset as usize;
        if off + n * 4 > buf.size as usize {
            return Err(RuntimeError::Gpu("bug: the output lies outside the arena".into()));
        }
        let mut out = vec![0f32; n];
        // SAFETY: the submission finished; the range was checked above.
        unsafe { std::ptr::copy_nonoverlapping(buf.ptr.add(off) as *const f32, out.as_mut_ptr(), n) };
        Ok(out)
    }

    fn clear_cache(&mut self) -> Result<(), RuntimeError> {
        self.fill_zero(self.cache);
        Ok(())
    }
}

impl Drop for Vulkan {
    fn drop(&mut self) {
        // SAFETY: the device is idle after the wait; every handle is destroyed once.
        unsafe {
            let d = &self.device;
            let _ = d.device_wait_idle();
            if self.fence != vk::Fence::null() {
                d.destroy_fence(self.fence, None);
            }
            if self.cmd_pool != vk::CommandPool::null() {
                d.destroy_command_pool(self.cmd_pool, None);
            }
            if self.desc_pool != vk::DescriptorPool::null() {
                d.destroy_descriptor_pool(self.desc_pool, None);
            }
            for k in &self.kernels {
                d.destroy_pipeline(k.pipeline, None);
                d.destroy_pipeline_layout(k.layout, None);
                d.destroy_descriptor_set_layout(k.set_layout, None);
            }
            if self.shader != vk::ShaderModule::null() {
                d.destroy_shader_module(self.shader, None);
            }
            for b in &self.buffers {
                d.destroy_buffer(b.buffer, None);
                d.free_memory(b.memory, None);
            }
            d.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}
