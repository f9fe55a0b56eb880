//! Routing: method + path to a handler slot. Exact paths by hash; patterns with `{param}`
//! segments and a trailing `*` in config order. A path that matches only with another method
//! answers 405 with the methods that would do.

use std::collections::HashMap;

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Debug, Clone)]
struct Route {
    /// The pattern as configured (`/hello/{name}`).
    pattern: String,
    segments: Vec<Segment>,
    /// `/prefix/*`: anything below the segments matches.
    prefix: bool,
    /// Uppercase methods; empty = any.
    methods: Vec<String>,
    handler: usize,
}

/// A route table, built once per config and shared by the workers.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
    /// Path -> routes without parameters or wildcard, in config order.
    exact: HashMap<String, Vec<usize>>,
    /// Routes with parameters or a wildcard, in config order.
    patterns: Vec<usize>,
}

/// What a lookup found.
#[derive(Debug, PartialEq)]
pub enum Match {
    /// A handler slot; its parameters were written to the caller's buffer.
    Found(usize),
    /// No route has this path.
    NotFound,
    /// Routes have this path, with these methods (`allow` header value).
    MethodNotAllowed(String),
}

/// A captured parameter: the route's name for it, and the byte range in the path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamPos {
    /// Index of the route the name belongs to.
    pub route: u32,
    /// Index of the parameter among the route's parameters.
    pub index: u16,
    /// Start of the value in the path.
    pub start: u32,
    /// Length of the value.
    pub len: u32,
}

/// Checks a route pattern: starts with `/`, `*` only as the last segment, `{name}` whole
/// segments with distinct names.
pub fn check_pattern(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    let parts: Vec<&str> = path[1..].split('/').collect();
    let mut names = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if *p == "*" {
            if i + 1 != parts.len() {
                return Err(format!("{path:?}: '*' may only end a route"));
            }
        } else if p.starts_with('{') || p.ends_with('}') {
            let name = p
                .strip_prefix('{')
                .and_then(|p| p.strip_suffix('}'))
                .filter(|n| !n.is_empty() && !n.contains(['{', '}']))
                .ok_or_else(|| {
                    format!("{path:?}: a parameter is a whole segment such as {{name}}")
                })?;
            if names.contains(&name) {
                return Err(format!("{path:?}: parameter {{{name}}} appears twice"));
            }
            names.push(name);
        } else if p.contains(['{', '}', '*']) {
            return Err(format!(
                "{path:?}: '{{', '}}' and '*' must be whole segments"
            ));
        }
    }
    Ok(())
}

impl Router {
    /// Adds a route to `handler`. The pattern must have passed [`check_pattern`].
    pub fn add(&mut self, path: &str, methods: &[String], handler: usize) {
        let mut parts: Vec<&str> = path[1..].split('/').collect();
        let prefix = parts.last() == Some(&"*");
        if prefix {
            parts.pop();
        }
        let segments: Vec<Segment> = parts
            .iter()
            .map(
                |p| match p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    Some(name) => Segment::Param(name.to_owned()),
                    None => Segment::Literal((*p).to_owned()),
                },
            )
            .collect();
        let is_exact = !prefix && segments.iter().all(|s| matches!(s, Segment::Literal(_)));
        let index = self.routes.len();
        self.routes.push(Route {
            pattern: path.to_owned(),
            segments,
            prefix,
            methods: methods.to_vec(),
            handler,
        });
        if is_exact {
            self.exact.entry(path.to_owned()).or_default().push(index);
        } else {
            self.patterns.push(index);
        }
    }

    /// The name of a captured parameter.
    pub fn param_name(&self, p: &ParamPos) -> &str {
        let route = &self.routes[p.route as usize];
        route
            .segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param(n) => Some(n.as_str()),
                Segment::Literal(_) => None,
            })
            .nth(p.index as usize)
            .unwrap_or("")
    }

    /// Finds the route for `method` and `path`; parameters go to `params` (cleared first).
    pub fn find(&self, method: &str, path: &str, params: &mut Vec<ParamPos>) -> Match {
        self.find_route(method, path, params).0
    }

    /// As [`find`](Self::find), with the pattern of the route found (empty when none).
    pub fn find_route(
        &self,
        method: &str,
        path: &str,
        params: &mut Vec<ParamPos>,
    ) -> (Match, &str) {
        params.clear();
        let mut allowed: Vec<&str> = Vec::new();
        let mut path_matched = false;
        if let Some(list) = self.exact.get(path) {
            for &i in list {
                path_matched = true;
                if self.method_ok(i, method, &mut allowed) {
                    return (
                        Match::Found(self.routes[i].handler),
                        &self.routes[i].pattern,
                    );
                }
            }
        }
        for &i in &self.patterns {
            if self.match_pattern(i, path, params) {
                path_matched = true;
                if self.method_ok(i, method, &mut allowed) {
                    return (
                        Match::Found(self.routes[i].handler),
                        &self.routes[i].pattern,
                    );
                }
            }
            params.clear();
        }
        let found = if path_matched {
            Match::MethodNotAllowed(allowed.join(", "))
        } else {
            Match::NotFound
        };
        (found, "")
    }

    fn method_ok<'a>(&'a self, i: usize, method: &str, allowed: &mut Vec<&'a str>) -> bool {
        let methods = &self.routes[i].methods;
        if methods.is_empty()
            || methods
                .iter()
                .any(|m| m == method || (method == "HEAD" && m == "GET"))
        {
            return true;
        }
        for m in methods {
            if !allowed.contains(&m.as_str()) {
                allowed.push(m);
            }
            // GET routes answer HEAD too, so the allow header says so (RFC 9110 9.3.2).
            if m == "GET" && !allowed.contains(&"HEAD") && !methods.iter().any(|o| o == "HEAD") {
                allowed.push("HEAD");
            }
        }
        false
    }

    fn match_pattern(&self, i: usize, path: &str, params: &mut Vec<ParamPos>) -> bool {
        let route = &self.routes[i];
        let Some(body) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = body.split('/');
        let mut offset = 1usize;
        let mut param_index = 0u16;
        for seg in &route.segments {
            let Some(part) = parts.next() else {
                return false;
            };
            match seg {
                Segment::Literal(lit) if part != lit => return false,
                Segment::Literal(_) => {}
                Segment::Param(_) if part.is_empty() => return false,
                Segment::Param(_) => {
                    params.push(ParamPos {
                        route: i as u32,
                        index: param_index,
                        start: offset as u32,
                        len: part.len() as u32,
                    });
                    param_index += 1;
                }
            }
            offset += part.len() + 1;
        }
        // A prefix route needs something below it (`/static/` at least); others nothing.
        parts.next().is_some() == route.prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let mut r = Router::default();
        let get = vec!["GET".to_owned()];
        r.add("/hello", &[], 0);
        r.add("/hello/{name}", &get, 1);
        r.add("/static/*", &[], 2);
        r.add("/users/{id}/posts/{post}", &get, 3);
        r.add("/only-post", &["POST".to_owned()], 4);
        r.add("/", &[], 5);
        r
    }

    fn find(r: &Router, method: &str, path: &str) -> (Match, Vec<(String, String)>) {
        let mut params = Vec::new();
        let m = r.find(method, path, &mut params);
        let named = params
            .iter()
            .map(|p| {
                let v = &path[p.start as usize..(p.start + p.len) as usize];
                (r.param_name(p).to_owned(), v.to_owned())
            })
            .collect();
        (m, named)
    }

    #[test]
    fn find_route_names_the_pattern() {
        let r = router();
        let mut params = Vec::new();
        assert_eq!(
            r.find_route("GET", "/hello/ada", &mut params).1,
            "/hello/{name}"
        );
        assert_eq!(
            r.find_route("GET", "/static/a/b", &mut params).1,
            "/static/*"
        );
        assert_eq!(r.find_route("GET", "/hello", &mut params).1, "/hello");
        assert_eq!(r.find_route("GET", "/nope", &mut params).1, "");
        assert_eq!(r.find_route("GET", "/only-post", &mut params).1, "");
    }

    #[test]
    fn exact_and_params() {
        let r = router();
        assert_eq!(find(&r, "GET", "/hello").0, Match::Found(0));
        assert_eq!(find(&r, "DELETE", "/hello").0, Match::Found(0));
        assert_eq!(
            find(&r, "GET", "/hello/ada"),
            (Match::Found(1), vec![("name".into(), "ada".into())])
        );
        assert_eq!(find(&r, "HEAD", "/hello/ada").0, Match::Found(1));
        assert_eq!(
            find(&r, "GET", "/users/7/posts/42").1,
            vec![("id".into(), "7".into()), ("post".into(), "42".into())]
        );
        assert_eq!(find(&r, "GET", "/").0, Match::Found(5));
    }

    #[test]
    fn prefix_matches_below_only() {
        let r = router();
        assert_eq!(find(&r, "GET", "/static/a/b.css").0, Match::Found(2));
        assert_eq!(find(&r, "GET", "/static/").0, Match::Found(2));
        assert_eq!(find(&r, "GET", "/static").0, Match::NotFound);
        assert_eq!(find(&r, "GET", "/staticx/a").0, Match::NotFound);
    }

    #[test]
    fn misses() {
        let r = router();
        assert_eq!(find(&r, "GET", "/nope").0, Match::NotFound);
        assert_eq!(find(&r, "GET", "/hello/").0, Match::NotFound);
        assert_eq!(find(&r, "GET", "/hello/a/b").0, Match::NotFound);
        assert_eq!(find(&r, "GET", "/users/7/posts").0, Match::NotFound);
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let r = router();
        assert_eq!(
            find(&r, "GET", "/only-post").0,
            Match::MethodNotAllowed("POST".into())
        );
        assert_eq!(
            find(&r, "POST", "/hello/x").0,
            Match::MethodNotAllowed("GET, HEAD".into())
        );
    }

    #[test]
    fn patterns_are_checked() {
        assert!(check_pattern("/a/{b}/*").is_ok());
        assert!(check_pattern("a").is_err());
        assert!(check_pattern("/a/*/b").is_err());
        assert!(check_pattern("/a{b}").is_err());
        assert!(check_pattern("/{a}/{a}").is_err());
        assert!(check_pattern("/{}").is_err());
    }
}
