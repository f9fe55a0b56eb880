//! `plughost new NAME`: scaffolds a plugin crate (a `cdylib` with an HTTP handler and a test
//! through `plughost-test`), adds it to the enclosing Cargo workspace, and prints the
//! `server.ron` lines that enable it, or, with `--config`, adds them to that file.

use std::{
    io,
    path::{Component, Path, PathBuf},
};

use crate::config::Config;

/// What `plughost new` was asked.
#[derive(Debug, Clone, clap::Args)]
pub struct NewArgs {
    /// The plugin's crate name (letters, digits, `-`, `_`; it starts with a letter).
    name: String,
    /// The folder to create it in (default: `plugins` when there is one here, else `.`).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Add the plugin and its route to this config file (comments and layout are kept).
    #[arg(short, long)]
    config: Option<PathBuf>,
}

/// Runs `plughost new`; returns the exit code.
pub fn run(args: &NewArgs) -> i32 {
    match scaffold(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("plughost new: {e}");
            1
        }
    }
}

fn scaffold(args: &NewArgs) -> Result<(), String> {
    let name = args.name.as_str();
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return Err(format!(
            "{name:?} is not a crate name: lower-case letters, digits, - and _, starting with a letter"
        ));
    }
    let here = std::env::current_dir().map_err(|e| e.to_string())?;
    let parent = match &args.dir {
        Some(d) => here.join(d),
        None if here.join("plugins").is_dir() => here.join("plugins"),
        None => here.clone(),
    };
    let dir = parent.join(name);
    if dir.exists() {
        return Err(format!("{} exists already", dir.display()));
    }
    std::fs::create_dir_all(dir.join("src")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let workspace = enclosing_workspace(&parent);
    let files = [
        ("Cargo.toml", cargo_toml(name, &dir)),
        ("src/lib.rs", lib_rs(name)),
        ("README.md", readme(name)),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!(
        "created {} (Cargo.toml, src/lib.rs with a test, README.md)",
        shown(&dir, &here)
    );
    if let Some(root) = &workspace {
        match add_member(root, &dir) {
            Ok(true) => println!(
                "added it to the workspace members in {}",
                shown(&root.join("Cargo.toml"), &here)
            ),
            Ok(false) => {}
            Err(e) => println!(
                "add it to the workspace members in {}: {e}",
                root.join("Cargo.toml").display()
            ),
        }
    }
    let so = target_dir(workspace.as_deref().unwrap_or(&dir))
        .join("debug")
        .join(format!("lib{}.so", name.replace('-', "_")));
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("config/server.ron"));
    let config = here.join(config);
    let lines = server_lines(name, &so, &config);
    match &args.config {
        Some(_) => add_to_config(&config, name, &lines)?,
        None => {
            println!(
                "\nadd to {} (merge into its `plugins` and `routes`; paths are relative to its folder):\n",
                shown(&config, &here)
            );
            println!("    plugins: {{\n        {}\n    }},", lines.plugin);
            println!("    routes: [\n        {}\n    ],", lines.route);
        }
    }
    let pkg = if workspace.is_some() {
        format!(" -p {name}")
    } else {
        String::new()
    };
    let build = format!("cargo test{pkg} && cargo build{pkg}");
    let build = match workspace {
        Some(_) => build,
        None => format!("(cd {} && {build})", shown(&dir, &here)),
    };
    println!("\nthen:\n    {build}");
    println!(
        "    plughost start -c {}   # from the plughost checkout: ./target/release/plughost",
        shown(&config, &here)
    );
    println!("    curl localhost:5200/{name}/ada");
    Ok(())
}

/// The `server.ron` lines for the plugin, its path relative to the config's folder.
struct Lines {
    plugin: String,
    route: String,
}

fn server_lines(name: &str, so: &Path, config: &Path) -> Lines {
    let from = config.parent().unwrap_or(Path::new("."));
    let path = relative(so, from);
    Lines {
        plugin: format!(
            "\"{name}\": (path: \"{}\", config: {{ \"hello\": (greeting: \"hello\") }}),",
            path.display()
        ),
        route: format!(
            "(path: \"/{name}/{{name}}\", handler: \"{name}.hello\", methods: [\"GET\"]),"
        ),
    }
}

/// Adds the plugin and its route to the config file, keeping everything else as it is; the
/// file is checked afterwards and left as it was when the result does not load.
fn add_to_config(config: &Path, name: &str, lines: &Lines) -> Result<(), String> {
    let before =
        std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut text = insert(&before, "plugins", '{', &lines.plugin);
    text = insert(&text, "routes", '[', &lines.route);
    std::fs::write(config, &text).map_err(|e| format!("{}: {e}", config.display()))?;
    if let Err(e) = Config::load(config, None) {
        std::fs::write(config, &before).map_err(|e| format!("{}: {e}", config.display()))?;
        return Err(format!(
            "adding {name} to {} would break it ({e}); it is unchanged",
            config.display()
        ));
    }
    println!(
        "added plugin {name:?} and its route to {}",
        config.display()
    );
    Ok(())
}

/// `text` with `entry` added to its `key: {`/`key: [` collection (or a new one before the
/// config's closing parenthesis).
fn insert(text: &str, key: &str, open: char, entry: &str) -> String {
    let close = if open == '{' { '}' } else { ']' };
    let mut out = String::with_capacity(text.len() + entry.len() + 32);
    let mut done = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if !done {
            if let Some(rest) = trimmed
                .strip_prefix(key)
                .and_then(|r| r.trim_start().strip_prefix(':'))
            {
                let rest = rest.trim_start();
                if rest.starts_with(&format!("{open}{close}")) {
                    // `plugins: {},` becomes a collection of one.
                    let after = &rest[2..];
                    out.push_str(&format!(
                        "{indent}{key}: {open}\n{indent}    {entry}\n{indent}{close}{after}"
                    ));
                    done = true;
                    continue;
                }
                if rest.trim_end() == open.to_string() {
                    out.push_str(line);
                    out.push_str(&format!("{indent}    {entry}\n"));
                    done = true;
                    continue;
                }
            }
        }
        out.push_str(line);
    }
    if done {
        return out;
    }
    // No such key: a new one before the last `)`.
    match out.rfind(')') {
        Some(at) => {
            let mut before = out[..at].trim_end().to_owned();
            if !before.ends_with(',') && !before.ends_with('(') {
                before.push(',');
            }
            format!(
                "{before}\n    {key}: {open}\n        {entry}\n    {close},\n{}",
                &out[at..]
            )
        }
        None => out,
    }
}

/// The folder of the nearest `Cargo.toml` with a `[workspace]` at or above `from`.
fn enclosing_workspace(from: &Path) -> Option<PathBuf> {
    from.ancestors().find_map(|d| {
        let text = std::fs::read_to_string(d.join("Cargo.toml")).ok()?;
        text.lines()
            .any(|l| l.trim() == "[workspace]")
            .then(|| d.to_path_buf())
    })
}

/// Adds `dir` to the workspace's `members` (unless a glob or an entry covers it already);
/// false when nothing needed adding.
fn add_member(root: &Path, dir: &Path) -> io::Result<bool> {
    let manifest = root.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)?;
    let member = relative(dir, root).display().to_string();
    let parent = relative(dir.parent().unwrap_or(root), root)
        .display()
        .to_string();
    if text.contains(&format!("\"{member}\"")) || text.contains(&format!("\"{parent}/*\"")) {
        return Ok(false);
    }
    let Some(at) = text.find("members = [") else {
        return Err(io::Error::other("it has no `members = [` list"));
    };
    let end = at + "members = [".len();
    let updated = format!("{}\n    \"{member}\",{}", &text[..end], &text[end..]);
    std::fs::write(&manifest, updated)?;
    Ok(true)
}

/// Where cargo puts what it builds for the workspace or package at `root`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => std::env::current_dir().unwrap_or_default().join(t),
        None => root.join("target"),
    }
}

/// `path` relative to the folder `from` (both absolute), lexically.
fn relative(path: &Path, from: &Path) -> PathBuf {
    let (p, f) = (clean(path), clean(from));
    let common = p.iter().zip(&f).take_while(|(a, b)| a == b).count();
    if common <= 1 && path.is_absolute() {
        // Nothing in common but the root: the absolute path says it better.
        return path.to_path_buf();
    }
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// The components of `p` without `.` and with `..` applied.
fn clean(p: &Path) -> Vec<Component<'_>> {
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// A path as the user would type it from `here`.
fn shown(path: &Path, here: &Path) -> String {
    relative(path, here).display().to_string()
}

/// Where the plughost sources this binary was built from are, if they are still there:
/// the scaffold then depends on them by path.
fn sources() -> Option<PathBuf> {
    let core = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = core.parent()?;
    (root.join("plugin-api/Cargo.toml").is_file() && root.join("test-kit/Cargo.toml").is_file())
        .then(|| root.to_path_buf())
}

fn cargo_toml(name: &str, dir: &Path) -> String {
    let api = env!("CARGO_PKG_VERSION");
    let (plugin_api, test_kit) = match sources() {
        Some(root) => (
            format!(
                "{{ path = \"{}\" }}",
                relative(&root.join("plugin-api"), dir).display()
            ),
            format!(
                "{{ path = \"{}\" }}",
                relative(&root.join("test-kit"), dir).display()
            ),
        ),
        None => (format!("\"{}\"", crate_api_version()), format!("\"{api}\"")),
    };
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# A plugin is a shared library that the server loads.
crate-type = ["cdylib"]

[dependencies]
plughost-plugin-api = {plugin_api}
serde = {{ version = "1", features = ["derive"] }}

[dev-dependencies]
# Unit tests without a server: see the tests at the end of src/lib.rs.
plughost-test = {test_kit}
"#
    )
}

/// The plugin-api version this server speaks (a plugin must match its 0.x minor).
fn crate_api_version() -> String {
    let v = plughost_plugin_api::API_VERSION;
    v.rsplit_once('.')
        .map_or(v.to_owned(), |(minor, _)| minor.to_owned())
}

fn lib_rs(name: &str) -> String {
    format!(
        r##"//! {name}: a plughost plugin.
//!
//! `hello` greets: `GET /{name}/{{name}}` answers `hello, NAME!`, with how many requests this
//! worker's instance has served (one instance per worker thread: `&mut self`, no lock).
//! Its `config` in `server.ron` sets the greeting: `{{ "hello": (greeting: "hi") }}`.

use plughost_plugin_api::prelude::*;
use serde::Deserialize;

/// The component's config in `server.ron`.
#[derive(Deserialize)]
#[serde(default)]
struct Config {{
    greeting: String,
}}

impl Default for Config {{
    fn default() -> Self {{
        Config {{
            greeting: "hello".into(),
        }}
    }}
}}

struct Hello {{
    greeting: String,
    served: u64,
}}

impl HttpHandler for Hello {{
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {{
        self.served += 1;
        let name = req.param("name").unwrap_or("world");
        log::debug!("greeting {{name}}");
        let text = format!(
            "{{}}, {{name}}! (#{{}} on worker {{}})\n",
            self.greeting, self.served, req.worker_id
        );
        resp.text(200, &text);
    }}
}}

fn plugin() -> Plugin {{
    Plugin::new("{name}", env!("CARGO_PKG_VERSION")).http("hello", |cx| {{
        let config: Config = cx.config()?;
        Ok(Hello {{
            greeting: config.greeting,
            served: 0,
        }})
    }})
}}

export_plugin!(plugin);

#[cfg(test)]
mod tests {{
    use plughost_test::{{Harness, TestRequest}};

    #[test]
    fn greets_by_name() {{
        let h = Harness::new(super::plugin()).config("hello", r#"(greeting: "hi")"#);
        let mut hello = h.http("hello").route("/{name}/{{name}}");
        let resp = hello.request(TestRequest::get("/{name}/ada"));
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "hi, ada! (#1 on worker 0)\n");
    }}
}}
"##
    )
}

fn readme(name: &str) -> String {
    format!(
        "# {name}\n\nA plughost plugin: `GET /{name}/{{name}}` greets. `cargo test` runs its \
         tests without a server (plughost-test); `cargo build` makes \
         `lib{}.so`, which `server.ron` names (`plughost new` printed the lines).\n",
        name.replace('-', "_")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let r = |a: &str, b: &str| relative(Path::new(a), Path::new(b)).display().to_string();
        assert_eq!(
            r("/w/target/debug/libg.so", "/w/config"),
            "../target/debug/libg.so"
        );
        assert_eq!(r("/w/plugins/g", "/w"), "plugins/g");
        assert_eq!(r("/w", "/w"), ".");
        assert_eq!(r("/a/b", "/a/c/d"), "../../b");
        assert_eq!(r("/a/b", "/c/d"), "/a/b");
    }

    #[test]
    fn entries_go_into_the_existing_collections_or_new_ones() {
        let text = "(\n    // mine\n    plugins: {\n        \"a\": (path: \"a.so\"),\n    },\n    routes: [],\n)\n";
        let t = insert(text, "plugins", '{', "\"g\": (path: \"g.so\"),");
        let t = insert(&t, "routes", '[', "(path: \"/g\", handler: \"g.hello\"),");
        assert_eq!(
            t,
            "(\n    // mine\n    plugins: {\n        \"g\": (path: \"g.so\"),\n        \"a\": (path: \"a.so\"),\n    },\n    routes: [\n        (path: \"/g\", handler: \"g.hello\"),\n    ],\n)\n"
        );
        let bare = insert(
            "(\n    listen: \"127.0.0.1:0\"\n)\n",
            "routes",
            '[',
            "(path: \"/g\"),",
        );
        assert_eq!(
            bare,
            "(\n    listen: \"127.0.0.1:0\",\n    routes: [\n        (path: \"/g\"),\n    ],\n)\n"
        );
    }
}
