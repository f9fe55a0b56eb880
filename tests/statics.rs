//! Static files (the `static` section) through the real binary: types and validators,
//! traversal attempts sent raw (curl would normalize them), symlinks leaving the folder,
//! 304, ranges, HEAD, precompressed siblings, a large file through sendfile, the send
//! timeout, before/after the routes, a missing root, and a reload that changes the section.

use std::{
    io::Read,
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::common::{
    is_http_date, run_plughost, start_existing_expect_failure, Config, Response, TestDir,
    TestServer, HELLO_BODY,
};

/// What the file outside the folder holds: no response may ever contain it.
const SECRET: &str = "SECRET-OUTSIDE-THE-ROOT";
const A_TXT: &str = "hello static\n";
const APP_JS: &str = "console.log('hello from app.js');\n";

/// A test folder with `public/` (the root) and a secret file beside it.
fn site() -> Arc<TestDir> {
    let dir = TestDir::new();
    let public = dir.path().join("public");
    let write = |rel: &str, bytes: &[u8]| {
        let path = public.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    write("index.html", b"<h1>home</h1>\n");
    write("a.txt", A_TXT.as_bytes());
    write("style.css", b"body { color: red }\n");
    write("docs/index.html", b"<h1>docs</h1>\n");
    write("app.js", APP_JS.as_bytes());
    write("app.js.gz", &gzip(APP_JS.as_bytes()));
    write("app.js.br", b"not really brotli");
    write("only-gz.css", b"p { margin: 0 }\n");
    write("only-gz.css.gz", &gzip(b"p { margin: 0 }\n"));
    write(".env", b"DB_PASSWORD=x\n");
    std::fs::write(dir.path().join("secret.txt"), SECRET).unwrap();
    let link =
        |target: &Path, name: &str| std::os::unix::fs::symlink(target, public.join(name)).unwrap();
    link(Path::new("../secret.txt"), "escape.txt");
    link(Path::new(".."), "up");
    link(Path::new("a.txt"), "inside.txt");
    link(&public.join("a.txt"), "absolute-inside.txt");
    dir
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Starts a server on `dir` with `static: (root: "public"<options>)` (relative to the config).
fn start(dir: &Arc<TestDir>, options: &str) -> TestServer {
    let config = Config::empty().extra(&format!("static: (root: \"public\"{options})"));
    TestServer::start_in(dir.clone(), &config.render(), &[])
}

/// Sends a raw request with extra header lines on a new connection.
fn request(server: &TestServer, method: &str, path: &str, headers: &[&str]) -> Response {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for h in headers {
        raw += h;
        raw += "\r\n";
    }
    raw += "Connection: close\r\n\r\n";
    server.conn().request(raw)
}

fn get(server: &TestServer, path: &str, headers: &[&str]) -> Response {
    request(server, "GET", path, headers)
}

/// The counters of `plughost info`'s `static files:` line: responses, sendfile responses,
/// sendfile bytes.
fn static_counters(server: &TestServer) -> (u64, u64, u64) {
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    let line = info
        .stdout
        .lines()
        .find(|l| l.starts_with("static files:"))
        .unwrap_or_else(|| panic!("no static files line in info:\n{}", info.stdout));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1], n[2])
}

#[test]
fn files_are_served_with_their_type_validators_and_index() {
    let dir = site();
    let server = start(&dir, "");
    let resp = get(&server, "/a.txt", &[]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), A_TXT);
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(resp.header("content-length"), Some("13"));
    assert_eq!(resp.header("accept-ranges"), Some("bytes"));
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    let etag = resp.header("etag").expect("an etag");
    let (mtime, len) = etag
        .trim_matches('"')
        .split_once('-')
        .expect("etag \"<mtime hex>-<len hex>\"");
    assert!(u64::from_str_radix(mtime, 16).is_ok(), "{etag}");
    assert_eq!(len, "d", "{etag}");
    assert!(
        is_http_date(resp.header("last-modified").unwrap()),
        "{resp:?}"
    );
    assert!(is_http_date(resp.header("date").unwrap()), "{resp:?}");

    let css = get(&server, "/style.css", &[]);
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    let home = get(&server, "/", &[]);
    assert_eq!(home.text(), "<h1>home</h1>\n");
    assert_eq!(
        home.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    // A folder without its slash is redirected to it (the query kept); with it, its index.
    let moved = get(&server, "/docs?x=1", &[]);
    assert_eq!(moved.status, 301, "{moved:?}");
    assert_eq!(moved.header("location"), Some("/docs/?x=1"));
    assert_eq!(get(&server, "/docs/", &[]).text(), "<h1>docs</h1>\n");
    assert_eq!(get(&server, "/missing.txt", &[]).status, 404);
    // A file is not a folder.
    assert_eq!(get(&server, "/a.txt/", &[]).status, 404);
    // Keep-alive: several files on one connection, pipelined.
    let mut conn = server.conn();
    conn.send("GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\nGET /style.css HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(conn.read_response().text(), A_TXT);
    assert_eq!(conn.read_response().text(), "body { color: red }\n");
    // Seven answered from the folder (the 404s came from the routes).
    assert_eq!(static_counters(&server).0, 7);
}

#[test]
fn traversal_attempts_never_leave_the_root() {
    let dir = site();
    let server = start(&dir, "");
    let attempts = [
        "/../secret.txt",
        "/./../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/.%2e/secret.txt",
        "/docs/%2e%2e/%2e%2e/secret.txt",
        "/docs/../../secret.txt",
        "/..%2fsecret.txt",
        "/..%2Fsecret.txt",
        "/docs/..%2f..%2fsecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/..\\secret.txt",
        "/..%5csecret.txt",
        "/docs/..%5C..%5Csecret.txt",
        "/a.txt%00",
        "/a.txt%00.html",
        "/%00",
        "//../secret.txt",
        "/escape.txt",
        "/up/secret.txt",
        "/%252e%252e/secret.txt",
    ];
    for path in attempts {
        let resp = get(&server, path, &[]);
        assert!(
            resp.status == 400 || resp.status == 404,
            "{path}: {} {resp:?}",
            resp.status
        );
        assert!(!resp.text().contains(SECRET), "{path} leaked the secret");
    }
    // The server is fine after all that.
    assert_eq!(get(&server, "/a.txt", &[]).text(), A_TXT);
}

#[test]
fn symlinks_leaving_the_root_are_refused_unless_allowed() {
    let dir = site();
    let server = start(&dir, "");
    // Links that stay inside are followed, relative or absolute.
    assert_eq!(get(&server, "/inside.txt", &[]).text(), A_TXT);
    assert_eq!(get(&server, "/absolute-inside.txt", &[]).text(), A_TXT);
    assert_eq!(get(&server, "/escape.txt", &[]).status, 404);
    assert_eq!(get(&server, "/up/secret.txt", &[]).status, 404);
    // Out and back in: the file is inside, so it is served.
    assert_eq!(get(&server, "/up/public/a.txt", &[]).text(), A_TXT);
    // Hidden files are not served by default.
    assert_eq!(get(&server, "/.env", &[]).status, 404);
    drop(server);

    let dir = site();
    let server = start(&dir, ", follow_symlinks: true, hidden: true");
    assert_eq!(get(&server, "/escape.txt", &[]).text(), SECRET);
    assert_eq!(get(&server, "/up/secret.txt", &[]).text(), SECRET);
    assert_eq!(get(&server, "/.env", &[]).text(), "DB_PASSWORD=x\n");
    // `..` is refused all the same.
    assert_eq!(get(&server, "/up/../secret.txt", &[]).status, 404);
}

#[test]
fn a_changed_file_is_served_fresh_and_a_swapped_in_symlink_is_refused() {
    let dir = site();
    let server = start(&dir, "");
    // One keep-alive connection stays on one worker, whose cache holds small files.
    let mut conn = server.conn();
    let mut get = |path: &str| conn.request(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert_eq!(get("/a.txt").text(), A_TXT);
    assert_eq!(get("/a.txt").text(), A_TXT);
    let a = dir.path().join("public/a.txt");
    // Same length, new content: the modification time tells.
    std::fs::write(&a, "HELLO STATIC\n").unwrap();
    assert_eq!(get("/a.txt").text(), "HELLO STATIC\n");
    // A symlink leading outside, swapped in under the cached name.
    std::fs::remove_file(&a).unwrap();
    std::os::unix::fs::symlink("../secret.txt", &a).unwrap();
    let resp = get("/a.txt");
    assert_eq!(resp.status, 404, "{resp:?}");
    // The same for an index file.
    assert_eq!(get("/docs/").text(), "<h1>docs</h1>\n");
    std::fs::write(dir.path().join("public/docs/index.html"), "<h1>new</h1>\n").unwrap();
    assert_eq!(get("/docs/").text(), "<h1>new</h1>\n");
}

#[test]
fn unchanged_files_get_304_by_etag_or_date() {
    let dir = site();
    let server = start(&dir, "");
    let first = get(&server, "/a.txt", &[]);
    let etag = first.header("etag").unwrap().to_owned();
    let date = first.header("last-modified").unwrap().to_owned();
    let inm = format!("If-None-Match: {etag}");
    let resp = get(&server, "/a.txt", &[&inm]);
    assert_eq!(resp.status, 304, "{resp:?}");
    assert!(resp.body.is_empty());
    assert_eq!(resp.header("etag"), Some(etag.as_str()));
    assert_eq!(resp.header("content-length"), None, "{resp:?}");
    let weak = format!("If-None-Match: \"other\", W/{etag}");
    assert_eq!(get(&server, "/a.txt", &[&weak]).status, 304);
    assert_eq!(get(&server, "/a.txt", &["If-None-Match: *"]).status, 304);
    assert_eq!(
        get(&server, "/a.txt", &["If-None-Match: \"x-1\""]).status,
        200
    );

    let ims = format!("If-Modified-Since: {date}");
    assert_eq!(get(&server, "/a.txt", &[&ims]).status, 304);
    let old = "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT";
    assert_eq!(get(&server, "/a.txt", &[old]).text(), A_TXT);
    assert_eq!(
        get(&server, "/a.txt", &["If-Modified-Since: garbage"]).status,
        200
    );
    // If-None-Match wins over If-Modified-Since.
    assert_eq!(
        get(&server, "/a.txt", &["If-None-Match: \"x-1\"", &ims]).status,
        200
    );
    // HEAD revalidates too.
    assert_eq!(request(&server, "HEAD", "/a.txt", &[&inm]).status, 304);
}

#[test]
fn ranges_get_206_or_416() {
    let dir = site();
    let server = start(&dir, "");
    let part = |range: &str| get(&server, "/a.txt", &[&format!("Range: {range}")]);
    let resp = part("bytes=0-4");
    assert_eq!(resp.status, 206, "{resp:?}");
    assert_eq!(resp.text(), "hello");
    assert_eq!(resp.header("content-range"), Some("bytes 0-4/13"));
    assert_eq!(resp.header("content-length"), Some("5"));
    assert_eq!(part("bytes=6-").text(), "static\n");
    assert_eq!(part("bytes=-7").text(), "static\n");
    assert_eq!(
        part("bytes=6-1000").header("content-range"),
        Some("bytes 6-12/13")
    );
    let out = part("bytes=13-");
    assert_eq!(out.status, 416, "{out:?}");
    assert_eq!(out.header("content-range"), Some("bytes */13"));
    assert!(out.body.is_empty());
    // Several ranges, or a malformed one: the whole file.
    assert_eq!(part("bytes=0-1,3-4").status, 200);
    assert_eq!(part("bytes=4-1").text(), A_TXT);
    // If-Range: the range only while the validator still holds.
    let etag = get(&server, "/a.txt", &[])
        .header("etag")
        .unwrap()
        .to_owned();
    let holds = format!("If-Range: {etag}");
    assert_eq!(
        get(&server, "/a.txt", &["Range: bytes=0-4", &holds]).status,
        206
    );
    let stale = get(
        &server,
        "/a.txt",
        &["Range: bytes=0-4", "If-Range: \"0-1\""],
    );
    assert_eq!((stale.status, stale.text().as_str()), (200, A_TXT));
}

#[test]
fn head_sends_the_headers_and_no_body() {
    let dir = site();
    let server = start(&dir, "");
    let mut conn = server.conn();
    // On one keep-alive connection: a body sent after the HEAD would garble the GET.
    let head = conn.request("HEAD /a.txt HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-length"), Some("13"));
    assert_eq!(
        head.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(head.header("etag").is_some());
    let range = conn.request("HEAD /a.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n");
    assert_eq!(range.status, 206, "{range:?}");
    assert_eq!(range.header("content-length"), Some("2"));
    let get = conn.request("GET /style.css HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(get.text(), "body { color: red }\n");
    // Other methods are not static: they go to the routes (none here: 404).
    let post = request(&server, "POST", "/a.txt", &["Content-Length: 0"]);
    assert_eq!(post.status, 404, "{post:?}");
}

#[test]
fn precompressed_siblings_are_sent_to_clients_that_accept_them() {
    let dir = site();
    let server = start(&dir, "");
    let gz = get(&server, "/app.js", &["Accept-Encoding: gzip"]);
    assert_eq!(gz.header("content-encoding"), Some("gzip"), "{gz:?}");
    assert_eq!(gz.header("vary"), Some("accept-encoding"));
    assert_eq!(
        gz.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(gz.body, gzip(APP_JS.as_bytes()));
    let br = get(&server, "/app.js", &["Accept-Encoding: gzip, deflate, br"]);
    assert_eq!(br.header("content-encoding"), Some("br"), "{br:?}");
    assert_eq!(br.text(), "not really brotli");
    let no_br = get(&server, "/app.js", &["Accept-Encoding: br;q=0, gzip;q=0.8"]);
    assert_eq!(no_br.header("content-encoding"), Some("gzip"), "{no_br:?}");
    for refused in ["gzip;q=0", "identity", "deflate"] {
        let plain = get(
            &server,
            "/app.js",
            &[&format!("Accept-Encoding: {refused}")],
        );
        assert_eq!(
            plain.header("content-encoding"),
            None,
            "{refused}: {plain:?}"
        );
        assert_eq!(plain.text(), APP_JS, "{refused}");
    }
    assert_eq!(get(&server, "/app.js", &[]).text(), APP_JS);
    // A br-only client of a file with only a .gz sibling gets the file itself.
    let css = get(&server, "/only-gz.css", &["Accept-Encoding: br"]);
    assert_eq!(css.header("content-encoding"), None, "{css:?}");

    // A real client decodes what it was sent.
    let url = format!("http://{}/only-gz.css", server.addr());
    let out = Command::new("curl")
        .args(["-sS", "--compressed", "-D", "-", &url])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\np { margin: 0 }\n"), "{text}");
    drop(server);

    let dir = site();
    let server = start(&dir, ", precompressed: false");
    let plain = get(&server, "/app.js", &["Accept-Encoding: gzip, br"]);
    assert_eq!(plain.header("content-encoding"), None, "{plain:?}");
    assert_eq!(plain.text(), APP_JS);
}

/// Bytes that do not repeat in any short period (so an offset error shows).
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn a_large_file_goes_through_sendfile_intact() {
    let dir = site();
    let big = pattern(8 << 20);
    std::fs::write(dir.path().join("public/big.bin"), &big).unwrap();
    let server = start(&dir, "");
    let out = dir.path().join("downloaded.bin");
    let url = format!("http://{}/big.bin", server.addr());
    let status = Command::new("curl")
        .args(["-sS", "-f", "-o"])
        .arg(&out)
        .arg(&url)
        .status()
        .expect("curl runs");
    assert!(status.success(), "curl: {status}");
    let got = std::fs::read(&out).unwrap();
    assert!(
        got == big,
        "the download differs ({} bytes of {})",
        got.len(),
        big.len()
    );
    let (_, files, bytes) = static_counters(&server);
    assert_eq!((files, bytes), (1, 8 << 20), "sendfile counters");

    // A range from the middle, sendfile from an offset, on a keep-alive connection.
    let mut conn = server.conn();
    let resp =
        conn.request("GET /big.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=1000001-5000000\r\n\r\n");
    assert_eq!(resp.status, 206);
    assert!(resp.body == big[1_000_001..=5_000_000], "the range differs");
    assert_eq!(
        conn.request("GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            .text(),
        A_TXT
    );
    // A small range of it is copied, not sent with sendfile.
    let small = conn.request("GET /big.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=-100\r\n\r\n");
    assert!(small.body == big[big.len() - 100..]);
    assert_eq!(static_counters(&server), (4, 2, (8 << 20) + 4_000_000));
}

#[test]
fn a_client_that_reads_nothing_is_cut_off_by_the_send_timeout() {
    let dir = site();
    // Sparse: 256 MiB of zeros, more than any socket buffers hold.
    let file = std::fs::File::create(dir.path().join("public/huge.bin")).unwrap();
    file.set_len(256 << 20).unwrap();
    let config = Config::empty()
        .limit("send_timeout_ms", 1000)
        .extra("static: (root: \"public\")");
    let server = TestServer::start_in(dir.clone(), &config.render(), &[]);
    let mut conn = server.conn();
    conn.send("GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n");
    let connections = |server: &TestServer| {
        let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
        info.stdout
            .lines()
            .find_map(|l| l.strip_prefix("connections: "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no connections line:\n{}", info.stdout))
    };
    // The download has begun (the connection is counted) before the client stops reading.
    let start = Instant::now();
    while connections(&server) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the download never began"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    while connections(&server) != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the stalled download was not cut off"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What the client can still read ends well before the file does.
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let mut stream = conn.stream();
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n;
    }
    assert!(total < 256 << 20, "read {total} bytes");
    assert_eq!(get(&server, "/a.txt", &[]).text(), A_TXT);
}

#[test]
fn files_win_over_routes_or_only_fill_in_for_them() {
    let dir = site();
    std::fs::write(dir.path().join("public/hello"), "the file called hello\n").unwrap();
    let config = |before: bool| {
        Config::hello().extra(&format!(
            "static: (root: \"public\", before_routes: {before})"
        ))
    };
    let server = TestServer::start_in(dir.clone(), &config(false).render(), &[]);
    assert_eq!(get(&server, "/hello", &[]).text(), HELLO_BODY);
    assert_eq!(get(&server, "/a.txt", &[]).text(), A_TXT);
    drop(server);

    let dir = site();
    std::fs::write(dir.path().join("public/hello"), "the file called hello\n").unwrap();
    let server = TestServer::start_in(dir.clone(), &config(true).render(), &[]);
    assert_eq!(
        get(&server, "/hello", &[]).text(),
        "the file called hello\n"
    );
    // Not a file: the routes answer.
    assert_eq!(get(&server, "/hello/ada", &[]).status, 200);
    // Not GET or HEAD: the routes answer (the hello route takes any method).
    let post = request(&server, "POST", "/hello", &["Content-Length: 0"]);
    assert_eq!(post.text(), HELLO_BODY);
}

#[test]
fn a_prefix_and_max_age_are_honoured() {
    let dir = site();
    let server = start(&dir, ", prefix: \"/assets/\", max_age: 3600");
    let resp = get(&server, "/assets/a.txt", &[]);
    assert_eq!(resp.text(), A_TXT);
    assert_eq!(resp.header("cache-control"), Some("public, max-age=3600"));
    assert_eq!(get(&server, "/a.txt", &[]).status, 404);
    assert_eq!(
        get(&server, "/assets", &[]).header("location"),
        Some("/assets/")
    );
    assert_eq!(get(&server, "/assets/", &[]).text(), "<h1>home</h1>\n");
    assert_eq!(get(&server, "/assetsa.txt", &[]).status, 404);
}

#[test]
fn a_missing_root_is_refused_with_its_line() {
    let dir = TestDir::new();
    let config = Config::empty()
        .extra("static: (\n        root: \"nowhere\",\n    )")
        .render();
    let line = config
        .lines()
        .position(|l| l.contains("root: \"nowhere\""))
        .unwrap()
        + 1;
    dir.write_config(&config);
    let (status, stderr) = start_existing_expect_failure(&dir, &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("server.ron:{line}:9: static.root: ")),
        "{stderr}"
    );
    assert!(stderr.contains("nowhere does not exist"), "{stderr}");
}

#[test]
fn a_reload_applies_a_changed_static_section() {
    let dir = site();
    std::fs::create_dir_all(dir.path().join("v2")).unwrap();
    std::fs::write(dir.path().join("v2/a.txt"), "version 2\n").unwrap();
    let server = start(&dir, "");
    assert_eq!(get(&server, "/a.txt", &[]).text(), A_TXT);
    let config = Config::empty().extra("static: (root: \"v2\", max_age: 60)");
    dir.write_config(&config.render());
    let out = run_plughost(["reload", "-c", &server.config_path().to_string_lossy()]);
    assert!(out.status.success(), "{out:?}");
    server.wait_for_log("reloaded", Duration::from_secs(20));
    for _ in 0..8 {
        let resp = get(&server, "/a.txt", &[]);
        assert_eq!(resp.text(), "version 2\n");
        assert_eq!(resp.header("cache-control"), Some("public, max-age=60"));
    }
}
