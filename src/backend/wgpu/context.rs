//! Choosing an adapter and opening a device on it.
//!
//! Adapters are enumerated on the native APIs (Vulkan, Metal, DX12), or on GL when those
//! have none, ranked discrete > integrated > virtual > other > CPU (Mesa's lavapipe reports
//! itself as a CPU device) and numbered in that order: `--adapter 0` is the default choice,
//! `--adapter NAME` picks the first whose name contains NAME. `WGPU_BACKEND` (wgpu's own
//! variable, e.g. `vulkan` or `gl`) narrows the APIs looked at.
//!
//! The device is opened with the adapter's own limits rather than WebGPU's defaults, because
//! the default 128 MiB storage binding is what decides how weights are split; optional
//! features (shader-f16, subgroups) are requested only when the adapter has them.
//!
//! The device's memory size ([`device_memory`]) is not part of wgpu's portable API. On
//! Vulkan it is read through wgpu's HAL: the largest `DEVICE_LOCAL` heap of
//! `vkGetPhysicalDeviceMemoryProperties` (a discrete GPU's VRAM; host memory for integrated
//! GPUs and lavapipe). Metal's `recommendedMaxWorkingSetSize` is not reachable through
//! wgpu-hal's public API, and DX12 and GL are not asked: there the size is unknown (`None`).

use crate::error::{Error, Result};

/// What `wick info` shows about one adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterInfoSummary {
    /// Position in the preference order (what `--adapter N` takes).
    pub index: usize,
    /// Adapter name as the driver reports it.
    pub name: String,
    /// Graphics API ("Vulkan", "Metal", "Dx12", "Gl").
    pub backend: String,
    /// "DiscreteGpu", "IntegratedGpu", "VirtualGpu", "Cpu" or "Other".
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Whether the adapter has shader-f16.
    pub shader_f16: bool,
    /// Whether the adapter has subgroup operations.
    pub subgroup: bool,
    /// Largest storage buffer binding, bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Largest buffer, bytes.
    pub max_buffer_size: u64,
    /// Largest workgroup along x.
    pub max_compute_workgroup_size_x: u32,
    /// Most invocations in one workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Whether this is a hardware GPU (discrete or integrated): what `--device auto` uses.
    pub is_hardware_gpu: bool,
    /// Bytes of the device's memory, where the API tells ([`device_memory`]).
    pub memory_bytes: Option<u64>,
}

/// An open device with what we learned about its adapter.
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter it was opened on.
    pub info: wgpu::AdapterInfo,
    /// The limits the device was opened with (the adapter's own).
    pub limits: wgpu::Limits,
    /// Whether subgroup kernels may be used.
    pub subgroup: bool,
    /// Whether shader-f16 is enabled.
    pub shader_f16: bool,
    /// Whether f16 ↔ f32 packing builtins (`unpack2x16float`) are allowed.
    pub f16_in_f32: bool,
    /// Bytes of the device's memory, where the API tells ([`device_memory`]).
    pub memory_bytes: Option<u64>,
}

/// Bytes of `adapter`'s memory: its largest `DEVICE_LOCAL` Vulkan heap (see the module doc),
/// or `None` on other APIs.
#[cfg(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
))]
pub fn device_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    // SAFETY: the HAL adapter is only read from (its physical device's memory properties)
    // while the guard keeps it alive; nothing is created or destroyed through it.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let instance = hal.shared_instance().raw_instance();
    // SAFETY: the physical device was enumerated from this instance, which outlives the call.
    let props =
        unsafe { instance.get_physical_device_memory_properties(hal.raw_physical_device()) };
    // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT, spelled as a number: wgpu does not re-export `ash`,
    // whose constant this is, and the bit is fixed by the Vulkan specification.
    const DEVICE_LOCAL: u32 = 0x1;
    props
        .memory_heaps_as_slice()
        .iter()
        .filter(|h| h.flags.as_raw() & DEVICE_LOCAL != 0)
        .map(|h| h.size)
        .max()
}

/// Bytes of `adapter`'s memory: unknown where wgpu has no Vulkan back end.
#[cfg(not(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
)))]
pub fn device_memory(_adapter: &wgpu::Adapter) -> Option<u64> {
    None
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    }
}

/// Compute-capable adapters of `backends` (narrowed by `WGPU_BACKEND` when set).
fn adapters_on(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends &= backends;
    if desc.backends.is_empty() {
        return Vec::new();
    }
    let instance = wgpu::Instance::new(desc);
    pollster::block_on(instance.enumerate_adapters(backends))
        .into_iter()
        .filter(|a| {
            a.get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
        })
        .collect()
}

/// Compute-capable adapters in preference order. GL is only looked at when no native API
/// (Vulkan, Metal, DX12) has an adapter: it is the weakest path, and probing it on a
/// headless machine costs time and prints display-server errors.
fn ranked_adapters() -> Vec<wgpu::Adapter> {
    let mut adapters = adapters_on(wgpu::Backends::PRIMARY);
    if adapters.is_empty() {
        adapters = adapters_on(wgpu::Backends::SECONDARY);
    }
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        (type_rank(i.device_type), backend_rank(i.backend))
    });
    adapters
}

fn summary(index: usize, a: &wgpu::Adapter) -> AdapterInfoSummary {
    let i = a.get_info();
    let l = a.limits();
    let f = a.features();
    AdapterInfoSummary {
        index,
        name: i.name.clone(),
        backend: format!("{:?}", i.backend),
        device_type: format!("{:?}", i.device_type),
        driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
        shader_f16: f.contains(wgpu::Features::SHADER_F16),
        subgroup: f.contains(wgpu::Features::SUBGROUP),
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_buffer_size: l.max_buffer_size,
        max_compute_workgroup_size_x: l.max_compute_workgroup_size_x,
        max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        is_hardware_gpu: matches!(
            i.device_type,
            wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
        ),
        memory_bytes: device_memory(a),
    }
}

/// Every compute-capable adapter, in the order `--adapter N` numbers them.
pub fn list_adapters() -> Vec<AdapterInfoSummary> {
    ranked_adapters()
        .iter()
        .enumerate()
        .map(|(i, a)| summary(i, a))
        .collect()
}

/// Whether a hardware GPU (discrete or integrated) is present: the `--device auto` rule.
pub fn has_hardware_gpu() -> bool {
    list_adapters().iter().any(|a| a.is_hardware_gpu)
}

impl GpuContext {
    /// Uses a device the application opened (see [`super::WgpuOptions::device`]): the
    /// kernels follow the features and limits it was opened with.
    pub fn from_device(
        shared: &super::SharedDevice,
        allow_subgroup: bool,
        allow_f16: bool,
    ) -> Self {
        let info = shared.adapter.get_info();
        let downlevel = shared.adapter.get_downlevel_capabilities().flags;
        let features = shared.device.features();
        let subgroup = allow_subgroup && features.contains(wgpu::Features::SUBGROUP);
        let shader_f16 = allow_f16 && features.contains(wgpu::Features::SHADER_F16);
        let f16_in_f32 = downlevel.contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32)
            && (shader_f16 || info.driver.to_lowercase() != "llvmpipe");
        GpuContext {
            device: shared.device.clone(),
            queue: shared.queue.clone(),
            info,
            limits: shared.device.limits(),
            subgroup,
            shader_f16,
            f16_in_f32,
            memory_bytes: device_memory(&shared.adapter),
        }
    }

    /// Opens the adapter chosen by `choice` (see the module doc) with its own limits.
    pub fn open(choice: Option<&str>, allow_subgroup: bool, allow_f16: bool) -> Result<Self> {
        let adapters = ranked_adapters();
        if adapters.is_empty() {
            return Err(Error::Device(
                "no GPU adapter with compute shaders was found (on Linux without a GPU, \
                 install Mesa's software Vulkan driver: apt-get install mesa-vulkan-drivers)"
                    .into(),
            ));
        }
        let names = || {
            adapters
                .iter()
                .enumerate()
                .map(|(i, a)| format!("{i}: {}", a.get_info().name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let adapter = match choice.map(str::trim) {
            None | Some("") => &adapters[0],
            Some(c) => match c.parse::<usize>() {
                Ok(n) => adapters.get(n).ok_or_else(|| {
                    Error::Device(format!("no adapter {n}; adapters are {}", names()))
                })?,
                Err(_) => {
                    let want = c.to_lowercase();
                    adapters
                        .iter()
                        .find(|a| a.get_info().name.to_lowercase().contains(&want))
                        .ok_or_else(|| {
                            Error::Device(format!(
                                "no adapter named like `{c}`; adapters are {}",
                                names()
                            ))
                        })?
                }
            },
        };
        let info = adapter.get_info();
        let downlevel = adapter.get_downlevel_capabilities().flags;
        let limits = adapter.limits();
        let available = adapter.features();
        let mut features = wgpu::Features::empty();
        let subgroup = allow_subgroup && available.contains(wgpu::Features::SUBGROUP);
        let shader_f16 = allow_f16 && available.contains(wgpu::Features::SHADER_F16);
        if subgroup {
            features |= wgpu::Features::SUBGROUP;
        }
        if shader_f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wick"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Device(format!("cannot open {}: {e}", info.name)))?;
        // llvmpipe allows the packing builtins only with shader-f16 enabled.
        let f16_in_f32 = downlevel.contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32)
            && (shader_f16 || info.driver.to_lowercase() != "llvmpipe");
        Ok(GpuContext {
            device,
            queue,
            info,
            limits,
            subgroup,
            shader_f16,
            f16_in_f32,
            memory_bytes: device_memory(adapter),
        })
    }
}

/// The block `wick info` prints for the adapter: features and the limits that decide how
/// weights are split.
impl std::fmt::Display for AdapterInfoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let yes = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "adapter {}: {}", self.index, self.name)?;
        writeln!(f, "  backend      {}", self.backend)?;
        writeln!(f, "  device type  {}", self.device_type)?;
        writeln!(f, "  driver       {}", self.driver)?;
        match self.memory_bytes {
            Some(b) => writeln!(f, "  memory       {:.0} MiB", mib(b))?,
            None => writeln!(f, "  memory       unknown (wick reads it on Vulkan only)")?,
        }
        writeln!(
            f,
            "  features     shader-f16: {}, subgroups: {}",
            yes(self.shader_f16),
            yes(self.subgroup)
        )?;
        writeln!(
            f,
            "  limits       max_storage_buffer_binding_size {} ({:.0} MiB), max_buffer_size {} \
             ({:.0} MiB),",
            self.max_storage_buffer_binding_size,
            mib(self.max_storage_buffer_binding_size),
            self.max_buffer_size,
            mib(self.max_buffer_size)
        )?;
        write!(
            f,
            "               max_compute_workgroup_size_x {}, \
             max_compute_invocations_per_workgroup {}",
            self.max_compute_workgroup_size_x, self.max_compute_invocations_per_workgroup
        )
    }
}
