//! The component's config in `server.ron`, and what it resolves to.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use plughost_plugin_api::{Context, Error};
use serde::Deserialize;

use crate::client::Client;

/// `config: { "apollo": ( ... ) }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// The config service, `http://host:port`.
    server: String,
    /// The app id.
    app_id: String,
    /// The cluster.
    cluster: String,
    /// The namespaces, in priority order (the first one wins a key two of them give).
    namespaces: Vec<String>,
    /// The client ip Apollo sees (for gray releases); default the first non-loopback IPv4
    /// address of this machine.
    ip: Option<String>,
    /// How long a pull may take, in milliseconds.
    pull_timeout_ms: u64,
    /// The env file to write; default the server's `env_file` (the one `host.env` reads).
    env_file: Option<PathBuf>,
    /// Copy the old file to `FILE.bak` before each write.
    backup: bool,
    /// The app's access key secret, when Apollo requires signed requests.
    secret: Option<String>,
    /// Whether a failed pull at start stops the server's start (else the old file stays).
    fail_on_start_error: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: String::new(),
            app_id: String::new(),
            cluster: "default".into(),
            namespaces: vec!["application".into()],
            ip: None,
            pull_timeout_ms: 5000,
            env_file: None,
            backup: false,
            secret: None,
            fail_on_start_error: false,
        }
    }
}

/// The config, checked and with its defaults resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: String,
    pub app_id: String,
    pub cluster: String,
    pub namespaces: Vec<String>,
    pub ip: String,
    pub pull_timeout: Duration,
    pub env_file: PathBuf,
    pub backup: bool,
    pub secret: Option<String>,
    pub fail_on_start_error: bool,
}

impl Settings {
    /// From the component's config and the host (for the server's `env_file`).
    pub fn from_context(cx: &Context<'_>) -> Result<Settings, Error> {
        let c: Config = cx.config()?;
        let env_file = c.env_file.or_else(|| cx.host().env_file()).ok_or(
            "no env file: set env_file in server.ron (the file host.env reads) or in this component's config",
        )?;
        if c.app_id.is_empty() {
            return Err("app_id is required".into());
        }
        if c.namespaces.is_empty() || c.namespaces.iter().any(String::is_empty) {
            return Err("namespaces must name at least one namespace, none empty".into());
        }
        if c.pull_timeout_ms == 0 {
            return Err("pull_timeout_ms must be above 0".into());
        }
        let settings = Settings {
            server: c.server.trim_end_matches('/').to_owned(),
            app_id: c.app_id,
            cluster: if c.cluster.is_empty() {
                "default".into()
            } else {
                c.cluster
            },
            namespaces: c.namespaces,
            ip: c.ip.unwrap_or_else(|| {
                first_non_loopback()
                    .unwrap_or(Ipv4Addr::LOCALHOST)
                    .to_string()
            }),
            pull_timeout: Duration::from_millis(c.pull_timeout_ms),
            env_file,
            backup: c.backup,
            secret: c.secret.filter(|s| !s.is_empty()),
            fail_on_start_error: c.fail_on_start_error,
        };
        // The URL is checked here, so a bad one stops the start with the reason.
        settings.try_client()?;
        Ok(settings)
    }

    fn try_client(&self) -> Result<Client, String> {
        Client::new(
            &self.server,
            &self.app_id,
            &self.cluster,
            &self.ip,
            self.secret.as_deref(),
            self.pull_timeout,
        )
    }

    /// A client (the URL was checked when the settings were made).
    pub fn client(&self) -> Client {
        self.try_client().expect("checked in from_context")
    }
}

/// The first IPv4 address of a network interface that is not loopback.
fn first_non_loopback() -> Option<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_addr, when not null, points to a sockaddr of the family it says; for
        // AF_INET that is a sockaddr_in.
        unsafe {
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() {
                    found = Some(ip);
                    break;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}
