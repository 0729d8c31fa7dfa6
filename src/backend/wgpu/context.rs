//! The wgpu device underneath the backend: adapter selection, limits,
//! shader modules and pipelines (cached by shader and entry point), the
//! buffer pool, and the command stream.
//!
//! Ops are recorded into one pending command encoder, one compute pass per
//! dispatch, and submitted only when the host needs data back (`download`,
//! `sum_sq`), when host data is written into a buffer (`upload`), or when
//! the parameter arena fills up. So a training step runs without a CPU
//! round-trip except the reads the caller asks for.
//!
//! Each dispatch's scalar parameters go into a slot of one uniform "arena"
//! buffer; the slots of the pending encoder are written with a single
//! `write_buffer` just before it is submitted (queue writes land before the
//! command buffers of the same submit, after every earlier submit).

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use crate::backend::fault::{device_fault, max_device_memory, mib, oom_message};
use crate::error::{Error, Result};

/// A WGSL source file, prepended with `shaders/common.wgsl` when compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    Elementwise,
    Bias,
    Matmul,
    Norm,
    Activation,
    Attention,
    Embedding,
    Loss,
    Adamw,
    Rope,
    Pool,
}

impl Shader {
    fn file(self) -> &'static str {
        match self {
            Shader::Elementwise => "elementwise.wgsl",
            Shader::Bias => "bias.wgsl",
            Shader::Matmul => "matmul.wgsl",
            Shader::Norm => "norm.wgsl",
            Shader::Activation => "activation.wgsl",
            Shader::Attention => "attention.wgsl",
            Shader::Embedding => "embedding.wgsl",
            Shader::Loss => "loss.wgsl",
            Shader::Adamw => "adamw.wgsl",
            Shader::Rope => "rope.wgsl",
            Shader::Pool => "pool.wgsl",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Shader::Elementwise => include_str!("../../../shaders/elementwise.wgsl"),
            Shader::Bias => include_str!("../../../shaders/bias.wgsl"),
            Shader::Matmul => include_str!("../../../shaders/matmul.wgsl"),
            Shader::Norm => include_str!("../../../shaders/norm.wgsl"),
            Shader::Activation => include_str!("../../../shaders/activation.wgsl"),
            Shader::Attention => include_str!("../../../shaders/attention.wgsl"),
            Shader::Embedding => include_str!("../../../shaders/embedding.wgsl"),
            Shader::Loss => include_str!("../../../shaders/loss.wgsl"),
            Shader::Adamw => include_str!("../../../shaders/adamw.wgsl"),
            Shader::Rope => include_str!("../../../shaders/rope.wgsl"),
            Shader::Pool => include_str!("../../../shaders/pool.wgsl"),
        }
    }
}

const COMMON: &str = include_str!("../../../shaders/common.wgsl");

/// Bytes of one parameter slot (64 words; also the binding size).
const PARAM_BYTES: u64 = 256;
/// Size of the parameter arena: this many dispatches per submit at most.
const ARENA_SLOTS: u64 = 2048;

/// How a buffer is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    ReadWrite,
}

/// One storage binding of a dispatch: binding index, access, buffer and the
/// bytes bound from offset 0.
pub struct Binding<'a> {
    pub index: u32,
    pub access: Access,
    pub buffer: &'a wgpu::Buffer,
    pub bytes: u64,
}

/// Free buffers by capacity in bytes (powers of two, see [`Gpu::alloc`]),
/// and the bytes of every storage buffer alive (in use or pooled).
#[derive(Default)]
pub struct Pool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    live: u64,
    /// Most bytes live at once (since creation or the last reset).
    peak: u64,
}

impl Pool {
    pub fn give_back(&mut self, buf: wgpu::Buffer) {
        self.free.entry(buf.size()).or_default().push(buf);
    }

    /// A buffer made by [`Gpu::create`] is destroyed.
    pub fn forget(&mut self, buf: wgpu::Buffer) {
        self.live = self.live.saturating_sub(buf.size());
        drop(buf);
    }

    /// Destroy every pooled buffer; returns the bytes freed.
    fn trim(&mut self) -> u64 {
        let freed: u64 = self.free.values().flatten().map(|b| b.size()).sum();
        self.free.clear();
        self.live = self.live.saturating_sub(freed);
        freed
    }
}

struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

struct Stream {
    encoder: Option<wgpu::CommandEncoder>,
    /// Parameter words of the pending dispatches, one slot each.
    params: Vec<u8>,
    slots: u64,
}

/// An opened adapter, device and queue.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Largest tensor held in one buffer binding (bytes); larger frozen
    /// weights are split by rows.
    pub split_bytes: u64,
    pub pool: Arc<Mutex<Pool>>,
    /// `BEFT_MAX_DEVICE_MEMORY`: a cap on the bytes of live storage buffers.
    cap: Option<u64>,
    /// Why the device was lost, once it is.
    lost: Arc<Mutex<Option<String>>>,
    /// The device as seen by the uncaptured-error handler (emptied on drop).
    handler_device: Arc<Mutex<Option<wgpu::Device>>>,
    arena: wgpu::Buffer,
    slot_bytes: u64,
    modules: Mutex<HashMap<Shader, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<(Shader, &'static str), Arc<Pipeline>>>,
    stream: Mutex<Stream>,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.handler_device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// Every adapter wgpu can see (Vulkan, Metal, DX12), in enumeration order:
/// `--device wgpu:N` picks the N-th.
pub fn adapters() -> Vec<wgpu::Adapter> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// One line describing an adapter (for `beft devices`).
pub fn describe(a: &wgpu::Adapter) -> String {
    let i = a.get_info();
    let l = a.limits();
    format!(
        "{} ({:?}, {:?}, driver {} {}; max storage binding {} MiB, max buffer {} MiB)",
        i.name,
        i.backend,
        i.device_type,
        i.driver,
        i.driver_info,
        l.max_storage_buffer_binding_size >> 20,
        l.max_buffer_size >> 20
    )
}

/// Index of the adapter `--device wgpu` picks: the first discrete GPU, else
/// integrated, virtual, CPU (software), other.
pub fn best_index(list: &[wgpu::Adapter]) -> Option<usize> {
    (0..list.len()).min_by_key(|&k| type_rank(list[k].get_info().device_type))
}

/// The adapter `--device wgpu[:N]` names: the N-th, or the best (discrete
/// GPU first, then integrated, virtual, CPU).
pub fn pick_adapter(index: Option<usize>) -> Result<wgpu::Adapter> {
    let mut list = adapters();
    if list.is_empty() {
        return Err(Error::msg(
            "--device wgpu: no wgpu adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers)",
        ));
    }
    match index {
        Some(i) if i < list.len() => Ok(list.swap_remove(i)),
        Some(i) => Err(Error::msg(format!(
            "--device wgpu:{i}: only {} adapter(s) found (see `beft devices`)",
            list.len()
        ))),
        None => {
            let best = best_index(&list).unwrap();
            Ok(list.swap_remove(best))
        }
    }
}

impl Gpu {
    /// Open `adapter` with its own limits (storage bindings and buffers as
    /// large as it allows, not the 128/256 MiB defaults). `split_bytes`
    /// lowers the size above which weights are split (tests use it to
    /// exercise the split path on small tensors).
    pub fn open(adapter: wgpu::Adapter, split_bytes: Option<u64>) -> Result<Gpu> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        if limits.max_storage_buffers_per_shader_stage < 10 {
            return Err(Error::msg(format!(
                "wgpu adapter {}: needs 10 storage buffers per shader stage, has {}",
                info.name, limits.max_storage_buffers_per_shader_stage
            )));
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("beft"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| {
            Error::msg(format!(
                "wgpu adapter {}: cannot open device: {e}",
                info.name
            ))
        })?;
        let cap = max_device_memory()?;
        // Device loss is recorded (and reported by the next read-back);
        // any other uncaptured error (validation, internal, out of memory
        // outside `create`) ends the op as a device fault, not an abort.
        let lost = Arc::new(Mutex::new(None));
        let lost2 = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            *lost2.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{reason:?}: {msg}"));
        });
        let dev_name = info.name.clone();
        let lost3 = lost.clone();
        // The handler lives inside the device: it holds the device through a
        // slot that `Gpu`'s Drop empties, so there is no reference cycle.
        let slot = Arc::new(Mutex::new(Some(device.clone())));
        let dev = slot.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            // A lost device reports it through its callback on the next
            // poll; errors about invalid objects are usually that.
            if lost3.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                let d = dev.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(d) = d {
                    let _ = d.poll(wgpu::PollType::Poll);
                }
            }
            let lost = lost3.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match lost {
                Some(why) => device_fault(format!(
                    "wgpu ({dev_name}): device lost: {why}; the run cannot go on on this device (a driver reset or a removed GPU)"
                )),
                None => device_fault(format!("wgpu ({dev_name}): {e}")),
            }
        }));
        let max_bind = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let split = split_bytes.unwrap_or(max_bind).min(max_bind) & !3;
        let slot_bytes = PARAM_BYTES.max(limits.min_uniform_buffer_offset_alignment as u64);
        let arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("beft params"),
            size: slot_bytes * ARENA_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            split_bytes: split.max(4),
            pool: Arc::new(Mutex::new(Pool::default())),
            cap,
            lost,
            handler_device: slot,
            arena,
            slot_bytes,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            stream: Mutex::new(Stream {
                encoder: None,
                params: Vec::new(),
                slots: 0,
            }),
        })
    }

    /// A storage buffer of at least `bytes` from the pool (capacity rounded
    /// up to a power of two so that shapes that vary batch to batch reuse
    /// buffers), contents undefined.
    pub fn alloc(&self, bytes: u64) -> wgpu::Buffer {
        let bytes = bytes.max(4);
        let mut cap = bytes.next_power_of_two().max(256);
        if cap > self.limits.max_buffer_size {
            cap = bytes.div_ceil(4) * 4;
        }
        if let Some(b) = self
            .pool
            .lock()
            .unwrap()
            .free
            .get_mut(&cap)
            .and_then(|v| v.pop())
        {
            return b;
        }
        self.create(cap)
    }

    /// A new (unpooled) storage buffer of exactly `bytes` (rounded to 4).
    /// Out of device memory (or over the `BEFT_MAX_DEVICE_MEMORY` cap, after
    /// the pool's free buffers are released) is a [`device_fault`].
    pub fn create(&self, bytes: u64) -> wgpu::Buffer {
        let size = bytes.max(4).div_ceil(4) * 4;
        let name = || format!("wgpu ({})", self.info.name);
        if size > self.limits.max_buffer_size {
            device_fault(format!(
                "{}: a buffer of {} is larger than the adapter allows ({}); try a smaller --batch or --eval-batch, or a shorter --max-len",
                name(),
                mib(size),
                mib(self.limits.max_buffer_size)
            ));
        }
        if let Some(cap) = self.cap {
            let mut pool = self.pool.lock().unwrap();
            if pool.live + size > cap {
                pool.trim();
            }
            if pool.live + size > cap {
                let free = cap.saturating_sub(pool.live);
                drop(pool);
                device_fault(oom_message(&name(), size, free, cap, true));
            }
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            let live = self.pool.lock().unwrap().live;
            device_fault(format!(
                "{}: out of device memory: asked for {} with {} already allocated by beft ({e}); try a smaller --batch or --eval-batch, a shorter --max-len, or --device cpu",
                name(),
                mib(size),
                mib(live)
            ));
        }
        let mut pool = self.pool.lock().unwrap();
        pool.live += size;
        pool.peak = pool.peak.max(pool.live);
        buf
    }

    /// Bytes of live storage buffers (in use or pooled).
    pub fn live_bytes(&self) -> u64 {
        self.pool.lock().unwrap().live
    }

    /// Bytes live now and the most live at once.
    pub fn memory(&self) -> (u64, u64) {
        let p = self.pool.lock().unwrap();
        (p.live, p.peak)
    }

    /// Destroy the pooled free buffers.
    pub fn release_cached(&self) {
        self.flush();
        self.pool.lock().unwrap().trim();
    }

    /// Start a new peak measurement from the bytes live now.
    pub fn reset_peak(&self) {
        let mut p = self.pool.lock().unwrap();
        p.peak = p.live;
    }

    /// Submit everything recorded and wait for the device to finish it.
    pub fn wait_idle(&self) {
        self.flush();
        if self
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .is_err()
        {
            self.lost_fault("while waiting for the queue");
        }
    }

    /// Lose the device on purpose (`wgpu::Device::destroy`), as a driver
    /// reset would: for the device-lost tests.
    #[doc(hidden)]
    pub fn destroy_device(&self) {
        self.device.destroy();
    }

    /// A device-lost fault, with the reason the driver gave.
    fn lost_fault(&self, during: &str) -> ! {
        let why = self
            .lost
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| "no reason given".into());
        device_fault(format!(
            "wgpu ({}): device lost ({during}): {why}; the run cannot go on on this device (a driver reset or a removed GPU)",
            self.info.name
        ))
    }

    fn module(&self, shader: Shader) -> Arc<wgpu::ShaderModule> {
        let mut m = self.modules.lock().unwrap();
        m.entry(shader)
            .or_insert_with(|| {
                let src = match std::env::var_os("BEFT_WGPU_SHADER_DIR") {
                    // Development: read the .wgsl files at run time (no rebuild).
                    Some(dir) => {
                        let dir = std::path::Path::new(&dir);
                        let read = |f: &str| {
                            std::fs::read_to_string(dir.join(f))
                                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()))
                        };
                        format!("{}\n{}", read("common.wgsl"), read(shader.file()))
                    }
                    None => format!("{COMMON}\n{}", shader.source()),
                };
                Arc::new(
                    self.device
                        .create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some(&format!("{shader:?}")),
                            source: wgpu::ShaderSource::Wgsl(src.into()),
                        }),
                )
            })
            .clone()
    }

    /// The pipeline of `entry` in `shader`, its bind-group layout made from
    /// the bindings of its first use (an entry point is always called with
    /// the same bindings).
    fn pipeline(&self, shader: Shader, entry: &'static str, binds: &[Binding]) -> Arc<Pipeline> {
        if let Some(p) = self.pipelines.lock().unwrap().get(&(shader, entry)) {
            return p.clone();
        }
        let module = self.module(shader);
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: NonZeroU64::new(PARAM_BYTES),
            },
            count: None,
        }];
        for b in binds {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: b.index,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: b.access == Access::Read,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(entry),
                entries: &entries,
            });
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(entry),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        let p = Arc::new(Pipeline { pipeline, layout });
        self.pipelines
            .lock()
            .unwrap()
            .insert((shader, entry), p.clone());
        p
    }

    /// Record one dispatch of `entry` over `groups` workgroups with the
    /// scalar parameters `params` (32-bit words).
    pub fn dispatch(
        &self,
        shader: Shader,
        entry: &'static str,
        params: &[u32],
        binds: &[Binding],
        groups: (u32, u32, u32),
    ) {
        assert!(params.len() * 4 <= PARAM_BYTES as usize);
        if groups.0 == 0 || groups.1 == 0 || groups.2 == 0 {
            return;
        }
        let pipe = self.pipeline(shader, entry, binds);
        let mut s = self.stream.lock().unwrap();
        if s.slots == ARENA_SLOTS {
            self.submit_locked(&mut s);
        }
        let offset = s.slots * self.slot_bytes;
        s.params.resize(offset as usize, 0);
        s.params.extend_from_slice(bytemuck::cast_slice(params));
        s.params.resize((offset + PARAM_BYTES) as usize, 0);
        s.slots += 1;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.arena,
                offset,
                size: NonZeroU64::new(PARAM_BYTES),
            }),
        }];
        for b in binds {
            entries.push(wgpu::BindGroupEntry {
                binding: b.index,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: 0,
                    size: NonZeroU64::new(b.bytes.max(4).div_ceil(4) * 4),
                }),
            });
        }
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.layout,
            entries: &entries,
        });
        let enc = self.encoder(&mut s);
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(entry),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }

    fn encoder<'s>(&self, s: &'s mut Stream) -> &'s mut wgpu::CommandEncoder {
        s.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        })
    }

    /// Record a buffer-to-buffer copy (byte offsets and size multiples of 4).
    pub fn copy(
        &self,
        src: &wgpu::Buffer,
        src_off: u64,
        dst: &wgpu::Buffer,
        dst_off: u64,
        bytes: u64,
    ) {
        if bytes == 0 {
            return;
        }
        let mut s = self.stream.lock().unwrap();
        self.encoder(&mut s)
            .copy_buffer_to_buffer(src, src_off, dst, dst_off, bytes);
    }

    /// Record zeroing of the first `bytes` of `buf`.
    pub fn clear(&self, buf: &wgpu::Buffer, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut s = self.stream.lock().unwrap();
        self.encoder(&mut s)
            .clear_buffer(buf, 0, Some(bytes.div_ceil(4) * 4));
    }

    fn submit_locked(&self, s: &mut Stream) {
        if let Some(enc) = s.encoder.take() {
            if !s.params.is_empty() {
                self.queue.write_buffer(&self.arena, 0, &s.params);
            }
            self.queue.submit(Some(enc.finish()));
        }
        s.params.clear();
        s.slots = 0;
    }

    /// Submit everything recorded so far (does not wait).
    pub fn flush(&self) {
        let mut s = self.stream.lock().unwrap();
        self.submit_locked(&mut s);
    }

    /// Write host bytes into `buf` at `offset`, ordered after every op
    /// recorded so far (which is submitted first: a pooled buffer may still
    /// be in use by a pending op).
    pub fn write(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.flush();
        if data.len().is_multiple_of(4) {
            self.queue.write_buffer(buf, offset, data);
        } else {
            let mut v = data.to_vec();
            v.resize(data.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(buf, offset, &v);
        }
    }

    /// Read `bytes` of `buf` from `offset` back to the host after every op
    /// recorded so far (one submit and one wait).
    pub fn read(&self, buf: &wgpu::Buffer, offset: u64, bytes: u64) -> Vec<u8> {
        if bytes == 0 {
            return Vec::new();
        }
        let size = bytes.div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("beft read-back"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut s = self.stream.lock().unwrap();
            self.encoder(&mut s)
                .copy_buffer_to_buffer(buf, offset, &staging, 0, size);
            self.submit_locked(&mut s);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        if self
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .is_err()
        {
            self.lost_fault("while waiting for a read-back");
        }
        match rx.recv() {
            Ok(Ok(())) => {}
            _ => self.lost_fault("while reading back a result"),
        }
        let Ok(range) = staging.get_mapped_range(..) else {
            self.lost_fault("while reading back a result")
        };
        let mut out = range.to_vec();
        drop(range);
        staging.unmap();
        out.truncate(bytes as usize);
        out
    }
}
