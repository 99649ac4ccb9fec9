//! Watching a running process: `LEGO_PUBLISH` (statistics published while it runs, for
//! `lego stats` and `lego top`) and `LEGO_METRICS` (the metrics endpoint).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use super::error::ConfigError;

/// Where the metrics are served (`LEGO_METRICS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// `IP:PORT` or `localhost:PORT`.
    Tcp(SocketAddr),
    /// `unix:PATH` (an absolute path).
    Unix(PathBuf),
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Parses `LEGO_PUBLISH`: `on` (the default) or `off`, also `1`/`0`.
pub(super) fn parse_publish(value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "1" | "yes" => Ok(true),
        "off" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::Publish {
            value: value.to_owned(),
        }),
    }
}

/// Parses `LEGO_METRICS`.
pub(super) fn parse_metrics(value: &str) -> Result<MetricsAddr, ConfigError> {
    let bad = || ConfigError::Metrics {
        value: value.to_owned(),
    };
    if let Some(path) = value.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        return if path.is_absolute() && path.file_name().is_some() {
            Ok(MetricsAddr::Unix(path))
        } else {
            Err(bad())
        };
    }
    if let Some(port) = value.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(MetricsAddr::Tcp(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            port,
        ))));
    }
    value
        .parse::<SocketAddr>()
        .map(MetricsAddr::Tcp)
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::super::settings::vars;
    use super::*;

    #[test]
    fn metrics_addresses() {
        assert_eq!(
            parse_metrics("127.0.0.1:9464").expect("valid"),
            MetricsAddr::Tcp("127.0.0.1:9464".parse().expect("addr"))
        );
        assert_eq!(
            parse_metrics("localhost:9464").expect("valid"),
            MetricsAddr::Tcp("127.0.0.1:9464".parse().expect("addr"))
        );
        assert_eq!(
            parse_metrics("[::1]:9464").expect("valid"),
            MetricsAddr::Tcp("[::1]:9464".parse().expect("addr"))
        );
        assert_eq!(
            parse_metrics("unix:/run/app/lego.sock").expect("valid"),
            MetricsAddr::Unix(PathBuf::from("/run/app/lego.sock"))
        );
        for bad in [
            "9464",
            "unix:rel.sock",
            "unix:/",
            "host:9464",
            "127.0.0.1:99999",
            "",
        ] {
            let e = parse_metrics(bad).expect_err(bad).to_string();
            assert!(e.contains(vars::METRICS) && e.contains("unix:PATH"), "{e}");
        }
    }

    #[test]
    fn publish_switch() {
        assert!(parse_publish("on").expect("on"));
        assert!(parse_publish("1").expect("1"));
        assert!(!parse_publish("OFF").expect("off"));
        assert!(!parse_publish("0").expect("0"));
        assert!(parse_publish("maybe").is_err());
    }
}
