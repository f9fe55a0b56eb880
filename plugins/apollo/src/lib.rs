//! apollo: the app's configuration from an Apollo config service, written to the server's
//! env file and applied live (as LaravelS's Apollo component does).
//!
//! - At start (`on_server_prepare`, before the workers serve) it pulls every namespace and
//!   writes the env file atomically; `host.env(key)` answers from it on every thread. If Apollo
//!   cannot be reached, the existing file stays (or, with `fail_on_start_error`, the start
//!   fails).
//! - A custom process long-polls Apollo's notifications; on a change it pulls the changed
//!   namespaces, rewrites the file and asks the server to reload (`host.request_reload`),
//!   which re-reads the file for every thread.
//! - An HTTP component shows the namespaces, their release keys and when the values last
//!   changed.
//!
//! Enable all three with one component config (see `config/apollo.ron`):
//!
//! ```ron
//! env_file: "../.env",
//! plugins: {
//!     "apollo": (
//!         path: "../target/release/libapollo.so",
//!         config: { "apollo": (server: "http://127.0.0.1:8080", app_id: "SampleApp") },
//!     ),
//! },
//! hooks: ["apollo.apollo"],
//! processes: { "apollo": (component: "apollo.apollo") },
//! routes: [(path: "/apollo", handler: "apollo.apollo", methods: ["GET"])],
//! ```
//!
//! Try it: `curl localhost:5200/apollo`.

mod client;
mod config;
mod envfile;
mod sign;
mod watch;

use std::{path::Path, time::SystemTime};

use plughost_plugin_api::prelude::*;

use client::{Error as ApolloError, Pull};
use config::Settings;
use envfile::{Namespace, Snapshot};

/// Pulls every namespace at start, before the workers serve.
struct Start {
    settings: Settings,
}

impl Lifecycle for Start {
    fn on_server_prepare(&mut self) -> Result<(), Error> {
        let s = &self.settings;
        let path = &s.env_file;
        match pull_all(s, &read_snapshot(path)) {
            Ok(fresh) => {
                let changed = apply(s, fresh)?;
                log::info!(
                    "pulled {} namespace(s) of {} from {}: {} {}",
                    s.namespaces.len(),
                    s.app_id,
                    s.server,
                    path.display(),
                    if changed { "written" } else { "unchanged" }
                );
                Ok(())
            }
            Err(e) if s.fail_on_start_error => {
                Err(format!("Apollo at {}: {e} (fail_on_start_error is set)", s.server).into())
            }
            Err(e) => {
                log::warn!(
                    "Apollo at {} failed at start: {e}; keeping the existing env file {}",
                    s.server,
                    path.display()
                );
                Ok(())
            }
        }
    }
}

/// The env file as the plugin last wrote it (empty when missing or hand-written).
fn read_snapshot(path: &Path) -> Snapshot {
    std::fs::read_to_string(path)
        .map(|t| envfile::parse(&t))
        .unwrap_or_default()
}

/// Pulls every configured namespace in full (no release key): the file is rebuilt from
/// Apollo alone. The first error ends it.
fn pull_all(s: &Settings, old: &Snapshot) -> Result<Snapshot, ApolloError> {
    let client = s.client();
    let mut fresh = Snapshot {
        changed: old.changed.clone(),
        namespaces: Vec::new(),
    };
    for name in &s.namespaces {
        let ns = match client.pull(name, "", &|| false)? {
            Pull::Release(r) => Namespace {
                name: name.clone(),
                release_key: r.release_key,
                values: r.values,
            },
            Pull::NotFound | Pull::NotModified => {
                log::warn!("namespace {name} has no release in Apollo: it gives no values");
                Namespace {
                    name: name.clone(),
                    ..Namespace::default()
                }
            }
        };
        fresh.namespaces.push(ns);
    }
    Ok(fresh)
}

/// Writes `fresh` unless the file already says the same; true when the values changed
/// (which is when `changed` is stamped and a reload is worth it).
fn apply(s: &Settings, mut fresh: Snapshot) -> Result<bool, Error> {
    let old = read_snapshot(&s.env_file);
    let values_changed = old.effective() != fresh.effective() || old.namespaces.is_empty();
    if values_changed {
        fresh.changed = Some(httpdate::fmt_http_date(SystemTime::now()));
    }
    let (text, left_out) = envfile::render(&fresh, &s.app_id, &s.cluster);
    if std::fs::read_to_string(&s.env_file).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    if !left_out.is_empty() {
        log::warn!(
            "left out of {}: {}",
            s.env_file.display(),
            left_out.join(", ")
        );
    }
    envfile::write_atomic(&s.env_file, &text, s.backup)
        .map_err(|e| format!("cannot write the env file {}: {e}", s.env_file.display()))?;
    Ok(values_changed)
}

/// `GET` on its route: the namespaces, release keys and the time of the last change, as JSON.
struct Status {
    settings: Settings,
}

impl HttpHandler for Status {
    fn handle(&mut self, _req: &Request<'_>, resp: &mut Response) {
        let s = &self.settings;
        let snapshot = read_snapshot(&s.env_file);
        let namespaces: Vec<_> = s
            .namespaces
            .iter()
            .map(|name| {
                let ns = snapshot.namespace(name);
                serde_json::json!({
                    "name": name,
                    "releaseKey": ns.map(|n| n.release_key.as_str()).filter(|k| !k.is_empty()),
                    "keys": ns.map_or(0, |n| n.values.len()),
                })
            })
            .collect();
        let body = serde_json::json!({
            "server": s.server,
            "appId": s.app_id,
            "cluster": s.cluster,
            "envFile": s.env_file.display().to_string(),
            "lastChange": snapshot.changed,
            "namespaces": namespaces,
        });
        resp.send(200, "application/json", format!("{body:#}\n").as_bytes());
    }
}

fn plugin() -> Plugin {
    Plugin::new("apollo", env!("CARGO_PKG_VERSION"))
        .lifecycle("apollo", |cx| {
            Ok(Start {
                settings: Settings::from_context(cx)?,
            })
        })
        .process("apollo", |cx| {
            Ok(watch::Watch::new(
                Settings::from_context(cx)?,
                cx.host().clone(),
            ))
        })
        .http("apollo", |cx| {
            Ok(Status {
                settings: Settings::from_context(cx)?,
            })
        })
}

export_plugin!(plugin);
