//! tally: counters by key in a shared table, the same on every worker. It shows `host.table`:
//! the table is declared in `server.ron`, holds exactly its `size` keys, and a key past that
//! is refused (507), never silently dropped.
//!
//! Enable it in `server.ron` (`config/tables.ron` is a complete example):
//!
//! ```ron
//! plugins: { "tally": (path: "../target/release/libtally.so") },
//! routes: [
//!     (path: "/tally", handler: "tally.tally", methods: ["GET"]),
//!     (path: "/tally/{key}", handler: "tally.tally", methods: ["GET", "POST", "DELETE"]),
//! ],
//! tables: {
//!     "tally": (size: 1000, columns: [(name: "n", kind: U64)]),
//! },
//! ```
//!
//! Try it (`plughost start -c config/tables.ron`):
//!
//! ```sh
//! curl -X POST localhost:5200/tally/apples    # 1 (the new value)
//! curl -X POST localhost:5200/tally/apples    # 2, whichever worker answers
//! curl localhost:5200/tally/apples            # 2
//! curl localhost:5200/tally                   # "1 1000": keys in use, capacity
//! curl -X DELETE localhost:5200/tally/apples  # 204
//! ```

use plughost_plugin_api::prelude::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(default)]
struct TallyConfig {
    /// The table to count in; it needs a `U64` column `n`.
    table: String,
}

impl Default for TallyConfig {
    fn default() -> Self {
        TallyConfig {
            table: "tally".into(),
        }
    }
}

/// `/tally` and `/tally/{key}`.
struct Tally {
    table: Table,
}

impl Tally {
    fn refused(&self, resp: &mut Response, e: HostError) {
        match e {
            HostError::TableFull => resp.text(
                507,
                &format!(
                    "table {} is full: all {} keys are in use; DELETE one first\n",
                    self.table.name(),
                    self.table.capacity()
                ),
            ),
            HostError::KeyTooLong => resp.text(414, "the key is too long\n"),
            e => resp.text(500, &format!("tally: {e}\n")),
        };
    }
}

impl HttpHandler for Tally {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        let Some(key) = req.param("key") else {
            let (count, capacity) = (self.table.count(), self.table.capacity());
            resp.text(200, &format!("{count} {capacity}\n"));
            return;
        };
        let done = match req.method.as_str() {
            "POST" => self
                .table
                .incr(key, "n", 1u64)
                .map(|n| resp.text(200, &format!("{n}\n"))),
            "DELETE" => self.table.del(key).map(|_| resp.set_status(204)),
            _ => self.table.get(key).map(|row| match row {
                Some(row) => resp.text(200, &format!("{}\n", row.u64("n").unwrap_or(0))),
                None => resp.text(404, &format!("no tally for {key:?}\n")),
            }),
        };
        if let Err(e) = done {
            self.refused(resp, e);
        }
    }
}

fn plugin() -> Plugin {
    Plugin::new("tally", env!("CARGO_PKG_VERSION")).http("tally", |cx| {
        let config: TallyConfig = cx.config()?;
        let table = cx.host().table(&config.table).map_err(|e| {
            format!(
                "table {:?}: {e}; declare it in server.ron's tables",
                config.table
            )
        })?;
        Ok(Tally { table })
    })
}

export_plugin!(plugin);

#[cfg(test)]
mod tests {
    use plughost_test::{Harness, TestRequest};

    #[test]
    fn counts_in_the_table_and_refuses_a_key_past_its_size() {
        let h = Harness::new(super::plugin())
            .tables(r#"{ "tally": (size: 2, columns: [(name: "n", kind: U64)]) }"#);
        let mut tally = h.http("tally").route("/tally/{key}");
        let post = |key: &str| TestRequest::post(&format!("/tally/{key}"), "");
        assert_eq!(tally.request(post("apples")).text(), "1\n");
        assert_eq!(tally.request(post("apples")).text(), "2\n");
        assert_eq!(tally.get("/tally/apples").text(), "2\n");
        assert_eq!(tally.request(post("pears")).text(), "1\n");
        let full = tally.request(post("plums"));
        assert_eq!(full.status, 507, "{}", full.text());
        assert_eq!(tally.get("/tally/plums").status, 404);
    }

    #[test]
    fn refuses_to_start_without_its_table() {
        let h = Harness::new(super::plugin());
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.http("tally")));
        let why = made
            .err()
            .and_then(|p| p.downcast::<String>().ok())
            .unwrap();
        assert!(why.contains("declare it in server.ron's tables"), "{why}");
    }
}
