//! HTTP handlers that return a `Result`, so `?` works inside them: an `Err` answers with its
//! status (a logged 500 unless it carries another one).

use std::fmt;

use crate::{
    component::{Context, Error, HttpHandler, Plugin},
    http::{Request, Response},
};

/// An HTTP handler whose `handle` may fail: `Err` answers the request with the error's status
/// and message. Registered with [`Plugin::try_http`].
pub trait TryHttpHandler: 'static {
    /// Fill `resp` for `req`, or fail.
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) -> Result<(), HttpError>;
}

/// Why a [`TryHttpHandler`] failed: a status and a message. Any `std::error::Error` converts
/// into one with `?` as a 500, whose message is logged and not sent (the client gets
/// "internal server error"); one made with a status below 500 sends its message.
#[derive(Debug)]
pub struct HttpError {
    status: u16,
    message: String,
}

impl HttpError {
    /// An error answered with `status` and `message`.
    pub fn new(status: u16, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            message: message.into(),
        }
    }

    /// 404: nothing here, as for a path without a route.
    pub fn not_found() -> HttpError {
        HttpError::new(404, "not found")
    }

    /// 400 with what is wrong with the request.
    pub fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::new(400, message)
    }

    /// The status it answers with.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// What it says.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl<E: std::error::Error> From<E> for HttpError {
    fn from(e: E) -> HttpError {
        HttpError::new(500, e.to_string())
    }
}

/// A [`TryHttpHandler`] as an [`HttpHandler`].
struct Fallible<T>(T);

impl<T: TryHttpHandler> HttpHandler for Fallible<T> {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        let Err(e) = self.0.handle(req, resp) else {
            return;
        };
        resp.reset();
        if e.status >= 500 {
            log::error!(
                "{} {}: {}",
                req.method.as_str(),
                req.path.as_str(),
                e.message
            );
            resp.text(e.status, "internal server error\n");
        } else {
            resp.text(e.status, &format!("{}\n", e.message));
        }
    }
}

impl Plugin {
    /// Provides an HTTP handler named `name` whose `handle` returns a `Result` (see
    /// [`TryHttpHandler`]), made by `factory` once per worker.
    pub fn try_http<T, F>(self, name: &str, factory: F) -> Self
    where
        T: TryHttpHandler,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.http(name, move |cx| factory(cx).map(Fallible))
    }
}
