//! The `info` command, run as a second process against a running server.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::common::{run_plughost, some_line_contains_all, Config};

#[test]
fn info_lists_plugins_components_workers_and_requests() {
    let server = Config::full().workers(2).start();
    for _ in 0..3 {
        assert_eq!(server.get("/hello").status, 200);
    }
    let info = || {
        let out = run_plughost([
            "info".as_ref(),
            "-c".as_ref(),
            server.config_path().as_os_str(),
        ]);
        assert!(out.status.success(), "{out:?}");
        out.stdout
    };
    // The counters may trail the responses by a moment.
    let mut text = info();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !text.lines().any(|l| l.trim() == "requests: 3") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        text = info();
    }
    let text = &text;
    for plugin in ["hello", "timing", "panicky"] {
        assert!(
            text.contains(plugin),
            "info does not name plugin {plugin}:\n{text}"
        );
    }
    for component in ["http hello", "middleware timing", "http slow"] {
        assert!(
            some_line_contains_all(text, &[component]),
            "info does not list {component:?}:\n{text}"
        );
    }
    assert!(text.contains("workers: 2"), "info:\n{text}");
    assert!(
        text.lines().any(|l| l.trim() == "requests: 3"),
        "info does not count the 3 requests:\n{text}"
    );
}
