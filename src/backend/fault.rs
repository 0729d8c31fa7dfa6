//! Device faults: running out of device memory, or losing the device. The
//! op vocabulary is infallible (a kernel launch returns its output buffer),
//! so a backend that meets such a fault inside an op raises a
//! [`DeviceFault`] — an unwinding panic with a typed payload and no panic
//! message — and the training and evaluation loops catch it with
//! [`catch_device_fault`] at the step boundary, where it becomes an ordinary
//! error: a message, a non-zero exit, the last checkpoint kept.
//!
//! [`max_device_memory`] is a user-set cap on what a GPU backend may
//! allocate (`BEFT_MAX_DEVICE_MEMORY`, like PyTorch's per-process memory
//! fraction): going over it is reported exactly like a real out-of-memory,
//! so the fault path is testable on any machine.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Once, OnceLock};

use crate::error::{Error, Result};

/// The payload of a device fault raised inside a backend op.
#[derive(Clone, Debug)]
pub struct DeviceFault(pub String);

/// Raise a device fault (see the module docs); meant to be caught by
/// [`catch_device_fault`] (the CLI's commands run inside one).
pub fn device_fault(msg: impl Into<String>) -> ! {
    quiet_hook();
    panic::panic_any(DeviceFault(msg.into()))
}

/// Run `f`; a [`DeviceFault`] raised inside becomes `Err` (other panics go
/// on unwinding).
pub fn catch_device_fault<R>(f: impl FnOnce() -> R) -> Result<R> {
    quiet_hook();
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Ok(r),
        Err(p) => match p.downcast::<DeviceFault>() {
            Ok(d) => Err(Error::msg(d.0)),
            Err(p) => panic::resume_unwind(p),
        },
    }
}

/// A panic hook that stays silent for device faults (they are reported as
/// errors by whoever catches them) and defers to the previous hook for
/// everything else.
fn quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if info.payload().is::<DeviceFault>() {
                return;
            }
            prev(info)
        }));
    });
}

/// A device budget set by the command line (`--max-gpu-memory`), which
/// takes precedence over `BEFT_MAX_DEVICE_MEMORY`.
static BUDGET: std::sync::Mutex<Option<u64>> = std::sync::Mutex::new(None);

/// Set (or with `None`, clear) the device budget of backends made from now
/// on (`--max-gpu-memory SIZE`, parsed by [`parse_bytes`]).
pub fn set_device_budget(spec: Option<&str>) -> Result<()> {
    let cap = match spec {
        Some(s) => Some(parse_bytes(s).ok_or_else(|| {
            Error::msg(format!(
                "--max-gpu-memory: cannot read '{s}' as a size (e.g. 4GiB, 512MiB, 8G)"
            ))
        })?),
        None => None,
    };
    *BUDGET.lock().unwrap_or_else(|e| e.into_inner()) = cap;
    Ok(())
}

/// The cap on device memory a GPU backend may allocate, in bytes, from
/// `BEFT_MAX_DEVICE_MEMORY` (a number of bytes with an optional `K`, `M`,
/// `G` (×1000^n) or `KiB`, `MiB`, `GiB` (×1024^n) suffix). `None`: no cap
/// (the device's own memory is the limit). A malformed value is an error.
pub fn max_device_memory() -> Result<Option<u64>> {
    if let Some(cap) = *BUDGET.lock().unwrap_or_else(|e| e.into_inner()) {
        return Ok(Some(cap));
    }
    static CAP: OnceLock<std::result::Result<Option<u64>, String>> = OnceLock::new();
    CAP.get_or_init(|| match std::env::var("BEFT_MAX_DEVICE_MEMORY") {
        Ok(s) if !s.trim().is_empty() => parse_bytes(&s).map(Some).ok_or_else(|| {
            format!(
                "BEFT_MAX_DEVICE_MEMORY: cannot read '{s}' as a size (e.g. 512MiB, 8GiB, 1000000)"
            )
        }),
        _ => Ok(None),
    })
    .clone()
    .map_err(Error::msg)
}

/// `"512MiB"` → 536870912; `"1.5G"` → 1500000000.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let x: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = x * mult;
    (0.0..1.8e19).contains(&v).then_some(v as u64)
}

/// Bytes in MiB, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The message of an out-of-memory fault.
pub fn oom_message(device: &str, asked: u64, free: u64, total: u64, capped: bool) -> String {
    format!(
        "{device}: out of device memory: asked for {} with {} free of {}{}; try a smaller --batch or --eval-batch, a shorter --max-len, --recompute, --offload stream (decoders), or --device cpu",
        mib(asked),
        mib(free),
        mib(total),
        if capped { " (the --max-gpu-memory / BEFT_MAX_DEVICE_MEMORY cap)" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("1.5G"), Some(1_500_000_000));
        assert_eq!(parse_bytes(" 8 GiB "), Some(8 << 30));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("12 parsecs"), None);
    }

    #[test]
    fn a_fault_becomes_an_error_and_other_panics_propagate() {
        let r: Result<()> = catch_device_fault(|| device_fault("gpu: out of device memory"));
        assert_eq!(r.unwrap_err().to_string(), "gpu: out of device memory");
        assert_eq!(catch_device_fault(|| 7).unwrap(), 7);
        let other = panic::catch_unwind(|| catch_device_fault(|| panic!("a bug")));
        assert!(other.is_err(), "a plain panic is not swallowed");
    }
}
