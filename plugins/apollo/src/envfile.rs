//! The env file the plugin writes, and reads back (its release keys and values survive a
//! reload or a restart of the server):
//!
//! ```text
//! # Written by plughost's Apollo plugin (app SampleApp, cluster default): edits are overwritten.
//! # changed: Tue, 15 Nov 2024 08:12:31 GMT
//!
//! # namespace: application
//! # release: 20241115081231-1a2b3c4d5e6f7a8b
//! DB_HOST=db.internal
//! GREETING="hello, world"
//! ```
//!
//! Keys are sorted within a namespace; a key already given by an earlier namespace is written
//! as a `# shadowed: KEY=value` comment (the first namespace listed wins, as in Apollo's Java
//! client; the comment keeps the namespace whole for the next change). Keys must match
//! `[A-Za-z_][A-Za-z0-9_.-]*`; others are left out and reported. A value is written bare when
//! it is made only of `[A-Za-z0-9_./:@%+,=-]`, else in double quotes with `\\ \" \n \r \t \$`
//! escaped (plughost's `host.env` reads it back exactly).

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// One namespace as last pulled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace {
    /// Its name.
    pub name: String,
    /// The release key of the values (empty: never pulled, or no release).
    pub release_key: String,
    /// Its configuration.
    pub values: BTreeMap<String, String>,
}

/// What the file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// When the values last changed (an HTTP date), if the file says.
    pub changed: Option<String>,
    /// The namespaces, in the configured order.
    pub namespaces: Vec<Namespace>,
}

impl Snapshot {
    /// The values the file gives, as a reader sees them (the first namespace wins).
    pub fn effective(&self) -> BTreeMap<&str, &str> {
        let mut all = BTreeMap::new();
        for ns in &self.namespaces {
            for (k, v) in &ns.values {
                if valid_key(k) {
                    all.entry(k.as_str()).or_insert(v.as_str());
                }
            }
        }
        all
    }

    /// The namespace `name`, if the file has it.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.name == name)
    }
}

/// Whether `key` can be an env file key.
pub fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A value as written: bare when safe, else double-quoted and escaped.
pub fn quote(value: &str) -> Cow<'_, str> {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:@%+,=-".contains(c));
    if bare {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '$' => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    Cow::Owned(out)
}

/// The inverse of [`quote`] (and of a plain `'single-quoted'` value).
pub fn unquote(v: &str) -> String {
    if let Some(inner) = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        return inner.to_owned();
    }
    let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return v.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// The file's text, and the keys left out (not valid), for the log.
pub fn render(snapshot: &Snapshot, app: &str, cluster: &str) -> (String, Vec<String>) {
    let mut text = format!(
        "# Written by plughost's Apollo plugin (app {app}, cluster {cluster}): edits are overwritten.\n"
    );
    if let Some(changed) = &snapshot.changed {
        text += &format!("# changed: {changed}\n");
    }
    let mut seen = BTreeSet::new();
    let mut left_out = Vec::new();
    for ns in &snapshot.namespaces {
        text += &format!("\n# namespace: {}\n", ns.name);
        if !ns.release_key.is_empty() {
            text += &format!("# release: {}\n", ns.release_key);
        }
        for (key, value) in &ns.values {
            if !valid_key(key) {
                left_out.push(format!("{key:?} in {} (not a valid key)", ns.name));
            } else if !seen.insert(key.as_str()) {
                text += &format!("{SHADOWED}{key}={}\n", quote(value));
            } else {
                text += &format!("{key}={}\n", quote(value));
            }
        }
    }
    (text, left_out)
}

/// The comment that keeps a key an earlier namespace gives.
const SHADOWED: &str = "# shadowed: ";

/// Reads back a file [`render`] wrote. Lines before the first `# namespace:` and foreign
/// lines are ignored: a hand-written file gives an empty snapshot.
pub fn parse(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for line in text.lines().map(str::trim) {
        if let Some(changed) = line.strip_prefix("# changed: ") {
            snapshot.changed = Some(changed.to_owned());
        } else if let Some(name) = line.strip_prefix("# namespace: ") {
            snapshot.namespaces.push(Namespace {
                name: name.to_owned(),
                ..Namespace::default()
            });
        } else if let Some(ns) = snapshot.namespaces.last_mut() {
            let shadowed = line.strip_prefix(SHADOWED).and_then(|l| l.split_once('='));
            if let Some(key) = line.strip_prefix("# release: ") {
                ns.release_key = key.to_owned();
            } else if let Some((k, v)) = shadowed {
                ns.values.insert(k.trim().to_owned(), unquote(v.trim()));
            } else if let (false, Some((k, v))) = (line.starts_with('#'), line.split_once('=')) {
                ns.values.insert(k.trim().to_owned(), unquote(v.trim()));
            }
        }
    }
    snapshot
}

/// Replaces `path` with `text` atomically: a temporary file beside it, written and synced,
/// then renamed over it (and the folder synced). A new file is made mode 0600 (it may hold
/// secrets); a replaced one keeps its mode. With `backup`, the old file is first copied to
/// `path.bak`.
pub fn write_atomic(path: &Path, text: &str, backup: bool) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.apollo-{}.tmp", std::process::id()));
    let mode = fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o7777);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if backup && path.exists() {
        fs::copy(path, dir.join(format!("{name}.bak")))?;
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, key: &str, values: &[(&str, &str)]) -> Namespace {
        Namespace {
            name: name.into(),
            release_key: key.into(),
            values: values
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn keys_are_validated() {
        for good in ["A", "_x", "DB_HOST", "spring.datasource.url", "a-b", "K9"] {
            assert!(valid_key(good), "{good}");
        }
        for bad in ["", "9A", "-a", ".a", "A B", "A=B", "é", "A\n", "#A"] {
            assert!(!valid_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn values_are_quoted_where_needed() {
        assert_eq!(quote("plain-1.2/x:y@z%+,=_"), "plain-1.2/x:y@z%+,=_");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("two words"), "\"two words\"");
        assert_eq!(quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quote("line1\nline2\r\t"), r#""line1\nline2\r\t""#);
        assert_eq!(quote("$HOME #x 'q'"), r#""\$HOME #x 'q'""#);
        for v in [
            "",
            "two words",
            "a\"b\\c",
            "l1\nl2\r\t",
            "$HOME",
            "ünï €",
            "a=b",
            "'x'",
        ] {
            assert_eq!(unquote(&quote(v)), v, "{v:?}");
        }
    }

    #[test]
    fn sections_are_sorted_and_the_first_namespace_wins() {
        let snapshot = Snapshot {
            changed: Some("Tue, 15 Nov 1994 08:12:31 GMT".into()),
            namespaces: vec![
                ns(
                    "application",
                    "r1",
                    &[("ZED", "z"), ("ALPHA", "a b"), ("bad key", "x")],
                ),
                ns(
                    "db",
                    "",
                    &[("ALPHA", "shadowed"), ("DB_HOST", "db.internal")],
                ),
            ],
        };
        let (text, left_out) = render(&snapshot, "app", "default");
        let expected = "# Written by plughost's Apollo plugin (app app, cluster default): edits are overwritten.\n\
            # changed: Tue, 15 Nov 1994 08:12:31 GMT\n\
            \n# namespace: application\n# release: r1\nALPHA=\"a b\"\nZED=z\n\
            \n# namespace: db\n# shadowed: ALPHA=shadowed\nDB_HOST=db.internal\n";
        assert_eq!(text, expected);
        assert_eq!(left_out.len(), 1, "{left_out:?}");
        assert!(left_out[0].contains("bad key"));
    }

    #[test]
    fn a_rendered_file_parses_back() {
        let snapshot = Snapshot {
            changed: Some("Tue, 15 Nov 1994 08:12:31 GMT".into()),
            namespaces: vec![
                ns("application", "r1", &[("A", "1"), ("Q", "say \"hi\"\n$x")]),
                ns("db.yml", "r2", &[("HOST", "h"), ("A", "shadowed value")]),
            ],
        };
        let (text, _) = render(&snapshot, "app", "default");
        assert_eq!(parse(&text), snapshot);
        assert_eq!(parse("A=1\n# hand-written\n"), Snapshot::default());
    }

    #[test]
    fn writes_replace_the_file_atomically_and_keep_its_mode() {
        let dir = std::env::temp_dir().join(format!("apollo-envfile-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(".env");
        write_atomic(&path, "A=1\n", false).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, "A=2\n", true).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "A=2\n");
        assert_eq!(fs::read_to_string(dir.join(".env.bak")).unwrap(), "A=1\n");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
