//! Device selection. The device is always chosen by the caller (CLI flag or
//! job spec); nothing in the worker hard-codes one.

use crate::{Error, Result};
use tch::Device;

/// Parse "cpu", "cuda" (= cuda:0) or "cuda:N", and check that libtorch can
/// actually use it.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    let device = match s.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Device::Cuda(n),
            None => return Err(Error::Device(s)),
        },
    };
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            return Err(Error::Invalid(format!(
                "device cuda:{n} requested but libtorch sees {count} cuda device(s)"
            )));
        }
    }
    Ok(device)
}

/// What libtorch can see on this machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceReport {
    pub cuda_available: bool,
    pub cuda_device_count: i64,
    pub cudnn_available: bool,
    pub cpu_threads: i32,
}

pub fn report() -> DeviceReport {
    DeviceReport {
        cuda_available: tch::Cuda::is_available(),
        cuda_device_count: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        cpu_threads: tch::get_num_threads(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device(" CPU ").unwrap(), Device::Cpu);
        assert!(matches!(parse_device("tpu"), Err(Error::Device(_))));
        assert!(matches!(parse_device("cuda:x"), Err(Error::Device(_))));
        if !tch::Cuda::is_available() {
            assert!(matches!(parse_device("cuda:0"), Err(Error::Invalid(_))));
        }
    }
}
