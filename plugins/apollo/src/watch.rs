//! The custom process: long-polls Apollo's notifications, pulls what changed, rewrites the
//! env file and asks the server to reload. Every request has a timeout, a failure backs off
//! from 1 s to 120 s, and a stop is heard within 100 ms, even in the middle of a long poll.

use std::time::{Duration, Instant};

use plughost_plugin_api::prelude::*;

use crate::{
    apply,
    client::{Client, Error as ApolloError, Pull},
    config::Settings,
    envfile::Namespace,
    read_snapshot,
};

/// The first wait after a failure; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(120);
/// The least time between two polls (a server answering 304 at once costs 2 requests a second).
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Why a round failed.
enum Failure {
    Apollo(ApolloError),
    EnvFile(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Apollo(e) => e.fmt(f),
            Failure::EnvFile(e) => f.write_str(e),
        }
    }
}

/// One instance of the process.
pub struct Watch {
    settings: Settings,
    host: Host,
    /// The notification id last seen of each namespace (-1: none yet). Kept in memory only: a
    /// restarted process asks again, and its pulls, with the file's release keys, answer 304.
    ids: Vec<(String, i64)>,
}

impl Watch {
    /// Watches the namespaces of `settings`.
    pub fn new(settings: Settings, host: Host) -> Watch {
        let ids = settings
            .namespaces
            .iter()
            .map(|n| (n.clone(), -1))
            .collect();
        Watch {
            settings,
            host,
            ids,
        }
    }

    /// Pulls the namespaces `changed` names, writes the file, asks for a reload when the
    /// values changed; then takes the new notification ids.
    fn on_notified(
        &mut self,
        client: &Client,
        changed: Vec<(String, i64)>,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), Failure> {
        let s = &self.settings;
        let old = read_snapshot(&s.env_file);
        let mut fresh = old.clone();
        fresh.namespaces = s
            .namespaces
            .iter()
            .map(|name| {
                old.namespace(name).cloned().unwrap_or_else(|| Namespace {
                    name: name.clone(),
                    ..Namespace::default()
                })
            })
            .collect();
        let mut taken = Vec::new();
        let mut pulled = Vec::new();
        for (name, id) in changed {
            let Some(ns) = fresh.namespaces.iter_mut().find(|n| same(&n.name, &name)) else {
                continue;
            };
            match client
                .pull(&ns.name, &ns.release_key, stop)
                .map_err(Failure::Apollo)?
            {
                Pull::Release(r) => {
                    ns.release_key = r.release_key;
                    ns.values = r.values;
                    pulled.push(format!("{} (release {})", ns.name, ns.release_key));
                }
                Pull::NotModified => {}
                Pull::NotFound => {
                    ns.release_key.clear();
                    ns.values.clear();
                    pulled.push(format!("{} (no release)", ns.name));
                }
            }
            taken.push((ns.name.clone(), id));
        }
        if apply(s, fresh).map_err(|e| Failure::EnvFile(e.to_string()))? {
            let reason = format!("Apollo changed {}", pulled.join(", "));
            log::info!("{reason}: {} rewritten", s.env_file.display());
            if let Err(e) = self.host.request_reload(&reason) {
                log::warn!("cannot ask the server to reload: {e}");
            }
        }
        for (name, id) in taken {
            if let Some(entry) = self.ids.iter_mut().find(|(n, _)| *n == name) {
                entry.1 = id;
            }
        }
        Ok(())
    }
}

/// Whether Apollo's `notified` names the configured namespace `name` (Apollo drops a
/// `.properties` suffix).
fn same(name: &str, notified: &str) -> bool {
    let bare = |n: &str| -> String {
        let lower = n.to_ascii_lowercase();
        match lower.strip_suffix(".properties") {
            Some(b) => n[..b.len()].to_owned(),
            None => n.to_owned(),
        }
    };
    name == notified || bare(name) == bare(notified)
}

impl Process for Watch {
    fn run(&mut self, ctx: &ProcessContext) {
        let client = self.settings.client();
        let stop = || ctx.should_stop();
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0u32;
        while !ctx.should_stop() {
            let started = Instant::now();
            let round = client
                .notifications(&self.ids, &stop)
                .map_err(Failure::Apollo)
                .and_then(|changed| match changed.is_empty() {
                    true => Ok(()),
                    false => self.on_notified(&client, changed, &stop),
                });
            let wait = match round {
                Ok(()) => {
                    if failures > 0 {
                        log::info!(
                            "Apollo at {} answers again (after {failures} failed attempts)",
                            self.settings.server
                        );
                    }
                    failures = 0;
                    backoff = BACKOFF_MIN;
                    POLL_INTERVAL.saturating_sub(started.elapsed())
                }
                Err(Failure::Apollo(ApolloError::Stopped)) => return,
                Err(e) => {
                    failures += 1;
                    // One warning when it starts failing; the retries are logged at debug.
                    if failures == 1 {
                        log::warn!(
                            "Apollo at {}: {e}; the env file stays as it is, retrying in {} s and backing off up to {} s",
                            self.settings.server,
                            backoff.as_secs(),
                            BACKOFF_MAX.as_secs()
                        );
                    } else {
                        log::debug!("Apollo attempt {failures} failed: {e}; next in {backoff:?}");
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    wait
                }
            };
            // Returns at once when the process is told to stop (or a message asks for a poll).
            if !wait.is_zero() {
                let _ = ctx.recv(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn properties_suffix_is_the_same_namespace() {
        assert!(same("application", "application"));
        assert!(same("application.properties", "application"));
        assert!(same("application", "application.PROPERTIES"));
        assert!(!same("application", "db"));
        assert!(!same("app.yml", "app"));
    }
}
