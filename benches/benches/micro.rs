//! Micro-benchmarks of plughost's building blocks (criterion, ~2 s each, < 1 min in all):
//!
//! 1. a call into the hello plugin through the ABI (`HttpHandlerBox` from `Slot::instantiate`,
//!    and the whole `http::pipeline::Instances::run`), with a request view of 10 headers and a
//!    1 KiB body, against the same handler logic called natively (`&mut dyn HttpHandler`);
//! 2. routing with a 20-route `Router`: an exact, a parameter and a prefix route;
//! 3. `Config::parse` of `config/server.ron`.
//!
//! Run: `cargo bench -p plughost-benches --bench micro`. It needs
//! `target/release/libhello.so`, and builds it (`cargo build --release -p hello`) when missing.
//! It also prints allocations per handler call: the native call's, and the ABI call's as this
//! binary's allocator sees them (a plugin's own allocations go to the allocator linked into
//! the `.so`, which no host-side counter sees).

use std::{
    hint::black_box,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use criterion::{criterion_group, criterion_main, Criterion};
use plughost::{
    config::{ComponentRef, Config},
    http::pipeline::Instances,
    plan::Plan,
    plugin::{host::Host, loader, Registry, Slot},
    router::{Match, ParamPos, Router},
    runtime::stats::Stats,
};
use plughost_plugin_api::{
    abi::{Component, ComponentKind, ThreadKind, WorkerInfo},
    abi_stable::std_types::{RSlice, RStr},
    Header, HttpHandler, HttpVersion, Request, Response,
};

/// Core's counting allocator, so the benches can count allocations per call.
#[global_allocator]
static ALLOC: plughost::runtime::alloc::Counting = plughost::runtime::alloc::Counting;

/// Allocations per call of `f` in the steady state.
fn allocations_per_call(what: &str, mut f: impl FnMut()) {
    for _ in 0..100 {
        f();
    }
    let before = plughost::runtime::alloc::allocations();
    for _ in 0..10_000 {
        f();
    }
    let n = plughost::runtime::alloc::allocations() - before;
    eprintln!("{what}: {:.2} allocations per call", n as f64 / 10_000.0);
}

const WORKER: WorkerInfo = WorkerInfo {
    kind: ThreadKind::Worker,
    id: 0,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// `target/release/libhello.so`, built first when missing.
fn hello_so() -> PathBuf {
    let so = root().join("target/release/libhello.so");
    if !so.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "--release", "-p", "hello"])
            .current_dir(root())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok && so.exists(),
            "cannot build {}; run `cargo build --release -p hello`",
            so.display()
        );
    }
    so
}

fn runtime_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("plughost-micro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("runtime dir");
    dir
}

/// A request view with 10 headers and a 1 KiB body, borrowing from `body`.
fn with_request<R>(f: impl FnOnce(&Request<'_>) -> R) -> R {
    let names = [
        "Host",
        "User-Agent",
        "Accept",
        "Accept-Encoding",
        "Accept-Language",
        "Connection",
        "Content-Type",
        "Content-Length",
        "X-Request-Id",
        "Cookie",
    ];
    let values: [&[u8]; 10] = [
        b"127.0.0.1:5200",
        b"wrk/4.1.0",
        b"*/*",
        b"gzip, deflate, br",
        b"en-US,en;q=0.9",
        b"keep-alive",
        b"application/octet-stream",
        b"1024",
        b"7f0c1e2d-3b4a-5968-8776-a5b4c3d2e1f0",
        b"session=abcdef0123456789; theme=dark",
    ];
    let headers: Vec<Header<'_>> = names
        .iter()
        .zip(values)
        .map(|(n, v)| Header {
            name: RStr::from_str(n),
            value: RSlice::from_slice(v),
        })
        .collect();
    let body = vec![b'x'; 1024];
    let req = Request {
        method: "POST".into(),
        path: "/hello".into(),
        query: "".into(),
        target: "/hello".into(),
        version: HttpVersion::Http11,
        headers: RSlice::from_slice(&headers),
        params: RSlice::from_slice(&[]),
        body: RSlice::from_slice(&body),
        peer: "127.0.0.1:40000".into(),
        conn_id: 1,
        worker_id: 0,
        route: "/hello".into(),
    };
    f(&req)
}

/// The hello plugin's handler, compiled into this binary (same logic as plugins/hello).
struct NativeHello {
    greeting: String,
    served: u64,
}

impl HttpHandler for NativeHello {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        self.served += 1;
        resp.set_header("content-type", "text/plain; charset=utf-8")
            .header("x-worker", itoa(req.worker_id as u64).as_str())
            .header("x-served", itoa(self.served).as_str());
        let _ = match req.param("name") {
            Some(name) => writeln!(resp, "{}, {name}!", self.greeting),
            None => writeln!(resp, "{} from plughost", self.greeting),
        };
    }
}

struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or("0")
    }
}

fn itoa(mut n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

fn plugin_call(c: &mut Criterion) {
    let so = hello_so();
    let run = runtime_dir();
    let host = Host::new(String::new(), None, Default::default()).boxed();

    // 1a. Straight through the HttpHandlerBox, as the pipeline does for one handler.
    let lib = loader::load("hello", &so, &run, false).expect("load libhello.so");
    let slot = Slot {
        reference: ComponentRef::parse("hello.hello").expect("ref"),
        kind: ComponentKind::HttpHandler,
        config: String::new(),
        library: Arc::new(lib),
        call: 0,
    };
    let Ok(Component::HttpHandler(mut handler)) = slot.instantiate(&host, WORKER) else {
        panic!("hello.hello is not an HTTP handler");
    };
    let mut resp = Response::new();
    with_request(|req| {
        allocations_per_call("plugin/abi_handler_call (host allocator only)", || {
            resp.reset();
            let _ = handler.handle(req, &mut resp);
        });
        c.bench_function("plugin/abi_handler_call", |b| {
            b.iter(|| {
                resp.reset();
                let r = handler.handle(black_box(req), &mut resp);
                black_box((&r, resp.body().len()));
            })
        });
    });

    // 1b. The whole per-request pipeline (`Instances::run`) with the plugin loaded by the
    // registry from a config, as a worker runs it.
    let text = format!(
        r#"(
    listen: "127.0.0.1:0",
    worker_num: 1,
    runtime_dir: "{run}",
    plugins: {{ "hello": (path: "{so}") }},
    routes: [(path: "/hello", handler: "hello.hello")],
)"#,
        run = run.display(),
        so = so.display()
    );
    let config = Config::parse(&text, Path::new("micro.ron")).expect("config");
    let registry = Registry::load(&config).expect("registry");
    let plan = Arc::new(Plan::build(&config, &registry).expect("plan"));
    let mut instances = Instances::create(plan, host.clone(), WORKER).expect("instances");
    let stats = Stats::new(1);
    let found = Match::Found(0);
    with_request(|req| {
        c.bench_function("plugin/pipeline_run", |b| {
            b.iter(|| {
                instances.run(black_box(req), &found, &mut resp, &stats.workers[0]);
                black_box(resp.body().len());
            })
        });
    });

    // 1c. The same handler logic, native.
    let mut native: Box<dyn HttpHandler> = Box::new(NativeHello {
        greeting: "hello".into(),
        served: 0,
    });
    with_request(|req| {
        allocations_per_call("plugin/native_call", || {
            resp.reset();
            native.handle(req, &mut resp);
        });
        c.bench_function("plugin/native_call", |b| {
            b.iter(|| {
                resp.reset();
                native.handle(black_box(req), &mut resp);
                black_box(resp.body().len());
            })
        });
    });
    drop(handler);
    instances.stop();
    let _ = std::fs::remove_dir_all(&run);
}

fn routing(c: &mut Criterion) {
    let mut router = Router::default();
    let get = vec!["GET".to_owned()];
    let any: Vec<String> = Vec::new();
    let routes = [
        "/",
        "/health",
        "/metrics",
        "/hello",
        "/api/v1/users",
        "/api/v1/orders",
        "/api/v1/products",
        "/api/v1/login",
        "/api/v1/logout",
        "/hello/{name}",
        "/api/v1/users/{id}",
        "/api/v1/users/{id}/posts",
        "/api/v1/orders/{id}",
        "/api/v1/orders/{id}/items/{item}",
        "/api/v1/products/{sku}",
        "/api/v1/users/{id}/posts/{post}",
        "/admin/*",
        "/assets/*",
        "/docs/*",
        "/static/*",
    ];
    for (i, r) in routes.iter().enumerate() {
        router.add(r, if i % 2 == 0 { &get } else { &any }, i);
    }
    let mut params: Vec<ParamPos> = Vec::with_capacity(8);
    for (name, path) in [
        ("router/exact", "/api/v1/products"),
        ("router/param", "/api/v1/users/42/posts/7"),
        ("router/prefix", "/static/css/site.css"),
    ] {
        assert!(
            matches!(router.find("GET", path, &mut params), Match::Found(_)),
            "{path}"
        );
        c.bench_function(name, |b| {
            b.iter(|| black_box(router.find(black_box("GET"), black_box(path), &mut params)))
        });
    }
}

fn config_parse(c: &mut Criterion) {
    let path = root().join("config/server.ron");
    let text = std::fs::read_to_string(&path).expect("config/server.ron");
    Config::parse(&text, &path).expect("config/server.ron parses");
    c.bench_function("config/parse_server_ron", |b| {
        b.iter(|| black_box(Config::parse(black_box(&text), &path)))
    });
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = micro;
    config = short();
    targets = plugin_call, routing, config_parse
}
criterion_main!(micro);
